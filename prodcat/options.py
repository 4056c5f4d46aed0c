"""Command-line flags shared by the commands that run the local pipeline (demo, bench); no heavy imports."""
import os

DEFAULT_MODEL_DIR = os.path.join("models", "myntra")
DEFAULT_DATA_DIR = os.path.join("..", "shared", "data")


def add_run_arguments(p, preprocess_workers: int, max_delay_ms: float) -> None:
    """The flags every command that runs the local pipeline shares (demo, bench)."""
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="the shared data (default ../shared/data)")
    p.add_argument("--model", default=DEFAULT_MODEL_DIR, help="model directory")
    p.add_argument("--preprocess-workers", type=int, default=preprocess_workers)
    p.add_argument("--max-batch", type=int, default=32,
                   help="inference batch limit: one checkpoint (flush, Redis, commit) per batch; on CPU it runs as small ORT runs")
    p.add_argument("--max-delay-ms", type=float, default=max_delay_ms)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
