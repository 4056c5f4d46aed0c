"""`prodcat <command>`: dispatches to the modules that do the work; no logic of its own."""
from __future__ import annotations

import argparse
import sys


def _worker(module: str):
    def run(argv):
        return __import__(module, fromlist=["main"]).main(argv)

    return run


# name → (help, module with add_arguments/run)
COMMANDS = {
    "demo": ("run the whole pipeline locally on real products and print a summary", "prodcat.demo"),
    "train": ("train the fused name+image model and export ONNX + manifest", "training.train"),
    "evaluate": ("evaluate a model on a split: metrics, ablations, baselines, plots", "training.evaluate"),
    "predict": ("offline batch inference: product events JSONL → results JSONL", "prodcat.predict"),
    "bench": ("measure every stage and the whole pipeline", "prodcat.bench"),
    "replay": ("dead letters of the given codes back onto the topics they were read from", "prodcat.replay"),
}
# workers take their own flags (every setting); `prodcat preprocess --help`
WORKERS = {
    "preprocess": ("run a preprocess worker (raw events → tensor records)", "preprocess_worker.__main__"),
    "inference": ("run an inference worker (tensor records → categories)", "gpu_worker.__main__"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in WORKERS:
        return _worker(WORKERS[argv[0]][1])(argv[1:])
    parser = argparse.ArgumentParser(prog="prodcat", description="product categorisation from name + photo")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, module) in {**COMMANDS, **WORKERS}.items():
        p = sub.add_parser(name, help=help_text, description=help_text, add_help=name in COMMANDS)
        if argv and argv[0] == name and name in COMMANDS:
            # only the chosen command's module is imported: `prodcat predict` never loads torch
            mod = __import__(module, fromlist=["add_arguments", "run"])
            mod.add_arguments(p)
            p.set_defaults(run=mod.run)
    args = parser.parse_args(argv)
    return args.run(args)

if __name__ == "__main__":
    sys.exit(main())
