"""Command-line flags shared by the commands that run the local pipeline (demo, bench); numbers go through
`common.settings.number`, as the workers' settings do."""
import argparse
import os

from common.settings import number, parse_number

DEFAULT_MODEL_DIR = os.path.join("models", "myntra")
DEFAULT_DATA_DIR = os.path.join("..", "shared", "data")


def sizes(text: str) -> list[int]:
    """argparse type: a comma list of sizes ≥ 1 (`--batches 1,8,32`)."""
    try:
        values = [parse_number(x, int, 1) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"wants a comma list of integers ≥ 1, got {text!r}")
    return values


def add_run_arguments(p, preprocess_workers: int, max_delay_ms: float) -> None:
    """The flags every command that runs the local pipeline shares (demo, bench)."""
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="the shared data (default ../shared/data)")
    p.add_argument("--model", default=DEFAULT_MODEL_DIR, help="model directory")
    p.add_argument("--preprocess-workers", type=number(), default=preprocess_workers)
    p.add_argument("--max-batch", type=number(), default=32,
                   help="inference batch limit: one checkpoint (flush, Redis, commit) per batch; on CPU it runs as small ORT runs")
    p.add_argument("--max-delay-ms", type=number(float, 0), default=max_delay_ms)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
