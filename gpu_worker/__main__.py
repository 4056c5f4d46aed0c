"""`python -m gpu_worker [flags]` — what the container runs. `--help` lists every setting."""
import sys

from common.runtime import worker_main


def main(argv=None) -> int:
    from gpu_worker.worker import InferenceWorker

    return worker_main("inference", "tensor records → batched ONNX inference → Redis + results topic", InferenceWorker, argv)


if __name__ == "__main__":
    sys.exit(main())
