"""The `prodcat` command as a user runs it: offline predict through the workers' code, clear CLI errors."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.support.tiny_model import expected_category


def prodcat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prodcat", *args], capture_output=True, text=True, input=stdin, timeout=120)


def test_predict_writes_one_result_or_error_per_line(tiny_model, sample_jpegs, tmp_path):
    lines = [
        json.dumps({"product_id": "a1", "name": "Blue Shirt"}),
        "this is not json",
        json.dumps({"product_id": "a2", "name": "Running shoes", "image_url": f"file://{sample_jpegs[0]}"}),
        json.dumps({"product_id": "a3", "name": "Steel watch", "image_url": "file:///nonexistent.jpg"}),
        "",
        json.dumps({"product_id": "a4"}),
    ]
    src = tmp_path / "events.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "results.jsonl"
    done = prodcat("predict", "--model", tiny_model, "--input", str(src), "--output", str(out))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("product_id") for r in rows] == ["a1", None, "a2", "a3", "a4"]  # the blank line is skipped
    assert rows[0]["category"] == expected_category("Blue Shirt") and rows[0]["model_version"] == "tiny-1"
    assert rows[2]["category"] == "Shoes" and rows[2]["category_path"][0] == "Shoes"
    assert (rows[1]["error"], rows[3]["error"], rows[4]["error"]) == ("BAD_JSON", "URL_FETCH_FAILED", "NOTHING_TO_CLASSIFY")
    assert "2 results, 3 errors" in done.stderr
    # a file of nothing but bad lines: its error records, and a failure status a script can see
    src.write_text("\n".join(lines[1::2]) + "\n")
    failed = prodcat("predict", "--model", tiny_model, "--input", str(src), "--output", str(out))
    assert failed.returncode == 1 and "no line of" in failed.stderr
    assert [json.loads(line)["error"] for line in out.read_text().splitlines()] == ["BAD_JSON", "URL_FETCH_FAILED", "NOTHING_TO_CLASSIFY"]


def test_bad_command_lines_fail_clearly(tmp_path):
    missing = prodcat("predict", "--model", str(tmp_path / "nope"), "--input", "-", "--output", "-", stdin="")
    assert missing.returncode == 2 and "manifest.json" in missing.stderr and "Traceback" not in missing.stderr
    unknown = prodcat("bench", "--stages", "warp-drive")
    assert unknown.returncode != 0 and "unknown stage" in unknown.stderr and "Traceback" not in unknown.stderr
    # numbers out of range: usage errors naming the flag (`bench --items 0` was a ZeroDivisionError minutes in,
    # `--batches 8,x` a ValueError traceback)
    for args, flag in ((("bench", "--items", "0"), "--items: wants an integer ≥ 1, got '0'"),
                       (("bench", "--batches", "8,x"), "--batches: wants a comma list of integers ≥ 1, got '8,x'"),
                       (("demo", "--max-delay-ms", "-1"), "--max-delay-ms: wants a number ≥ 0, got '-1'")):
        bad = prodcat(*args)
        assert bad.returncode == 2 and flag in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    listing = prodcat("--help")
    assert listing.returncode == 0 and all(c in listing.stdout for c in ("demo", "train", "evaluate", "predict", "bench"))
