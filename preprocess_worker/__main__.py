"""`python -m preprocess_worker [flags]` — what the container runs. `--help` lists every setting."""
import sys

from common.runtime import worker_main


def main(argv=None) -> int:
    from preprocess_worker.worker import PreprocessWorker

    return worker_main("preprocess", "raw product events → tensor records (and dead letters)", PreprocessWorker, argv)


if __name__ == "__main__":
    sys.exit(main())
