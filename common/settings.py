"""One frozen settings object per process, from defaults ← env vars (PRODCAT_*) ← CLI flags.

librdkafka options pass through untouched: env `PRODCAT_KAFKA__SECURITY_PROTOCOL=SASL_SSL`
(double underscore, then `_` → `.`) or flag `--kafka-opt security.protocol=SASL_SSL`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field

from common.images import FetchPolicy

ENV_PREFIX = "PRODCAT_"
KAFKA_ENV_PREFIX = "PRODCAT_KAFKA__"
# options the Python client reads itself, as Python booleans: given librdkafka's string "false", confluent-kafka
# raises TypeError when the client is created. Passed through as bools; anything but true / false is refused at load
KAFKA_CLIENT_BOOLS = ("delivery.report.only.error",)


def key_values(pairs, what: str) -> dict[str, str]:
    """("KEY=VALUE", …) → {KEY: VALUE}, both stripped: librdkafka's options and the CUDA provider's, passed through.
    A pair without '=' or without a key is a ValueError naming `what`, not a silent default."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} wants KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def cache_dir() -> str:
    """Where training features and benchmark inputs are kept between runs: $PRODCAT_CACHE, else
    ~/.cache/prodcat (created on first use)."""
    path = os.environ.get("PRODCAT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prodcat")
    os.makedirs(path, exist_ok=True)
    return path


@dataclass(frozen=True)
class Settings:
    bootstrap_servers: str = "127.0.0.1:9092"
    topic_raw: str = "products.raw"
    topic_tensors: str = "products.tensors"
    topic_results: str = "products.categories"
    topic_dlq: str = "products.dlq"
    preprocess_group: str = "prodcat-preprocess"
    inference_group: str = "prodcat-inference"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_key_prefix: str = "prodcat:product:"
    metrics_port: int = 9100  # /metrics, /healthz, /readyz; 0 = pick a free port
    model_dir: str = "models/myntra"
    providers: str = "auto"  # auto = TensorRT, CUDA, OpenVINO (int8 graphs), CPU — whichever are installed and work
    intra_op_threads: int = 1
    cuda_options: tuple[str, ...] = ()  # KEY=VALUE options of ONNX Runtime's CUDA provider, passed through
    precision: str = "auto"  # auto = the model's int8 graph on CPU when it has one, fp32 otherwise; or fp32 / int8
    max_batch: int = 64
    max_delay_ms: float = 20.0  # inference: batch deadline; preprocess: longest idle wait of a poll
    poll_batch: int = 256  # preprocess: events taken per poll, then flushed and committed together
    max_attempts: int = 3  # a dependency failing on one event this many times → dead letter, not a stuck partition
    model_reload_s: float = 5.0  # how often the inference worker looks for a new model version
    session_timeout_ms: int = 10_000
    image_policy: FetchPolicy = field(default_factory=FetchPolicy)
    kafka: tuple[tuple[str, str], ...] = ()  # extra librdkafka options, passed through

    def __post_init__(self) -> None:
        """Settings made in code (a test, the bench, a stack's workers) get the range checks env vars and flags get:
        `max_batch=0` failed deep in a worker at start, `max_delay_ms=nan` never released a batch."""
        numbers = {name: getattr(self, name) for name in _SIMPLE}
        numbers.update({f"image_{name}": getattr(self.image_policy, name) for name in _POLICY})
        for name, value in numbers.items():
            default = _DEFAULTS[name]
            if isinstance(default, bool) or not isinstance(default, (int, float)):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or isinstance(default, int) and not isinstance(value, int):
                raise ValueError(f"setting {name} wants {'an integer' if isinstance(default, int) else 'a number'}, got {value!r}")
            try:
                parse_number(value, type(default), *_bounds(name))
            except ValueError as e:
                raise ValueError(f"setting {name} {e}") from None

    def kafka_options(self) -> dict[str, str | bool]:
        return {k: v.lower() == "true" if k in KAFKA_CLIENT_BOOLS else v for k, v in self.kafka}


_SIMPLE = {f.name: f for f in dataclasses.fields(Settings) if f.name not in ("image_policy", "kafka")}
_POLICY = {f.name: f for f in dataclasses.fields(FetchPolicy)}
_DEFAULTS = {**{name: f.default for name, f in _SIMPLE.items()}, **{f"image_{name}": f.default for name, f in _POLICY.items()}}


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# numbers are never negative; these are also never 0 (a 0-item batch or 0 attempts would fail deep in a component at
# start, or dead-letter every event untried); the metrics port is a TCP port
_AT_LEAST_ONE = {"max_batch", "poll_batch", "max_attempts", "session_timeout_ms", "image_max_bytes", "image_max_pixels",
                 "image_max_side"}
_MOST = {"metrics_port": 65535}


def parse_number(text, kind=int, low=0, high=None):
    """`text` as a finite `kind` in low..high, else a ValueError saying what was wanted — for settings and for the
    commands' flags alike (a typo must not become a traceback, a division by zero, or an empty stage)."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < low or (high is not None and value > high):
        span = f"{low}–{high}" if high is not None else f"≥ {low}"
        raise ValueError(f"wants {'an integer' if kind is int else 'a number'} {span}, got {text!r}")
    return value


def _bounds(name: str) -> tuple[int, int | None]:
    """A numeric setting's range: never negative; some never 0; the metrics port a TCP port."""
    return (1 if name in _AT_LEAST_ONE else 0), _MOST.get(name)


def number(kind=int, low=1):
    """argparse type for a command's numeric flag: `--items 0` is a usage error naming the flag."""
    def parse(text: str):
        try:
            return parse_number(text, kind, low)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def _read(flags: dict, env, flag: str, env_var: str, default):
    """The flag's value, else the env var's, as the default's type (numbers in their range); None when neither is
    given. Anything else stops the process with one line naming the env var or flag it came from."""
    if flags.get(flag):
        raw, source = str(flags[flag]), f"--{flag.replace('_', '-')}"
    elif env.get(env_var) is not None:
        raw, source = str(env[env_var]), env_var
    else:
        return None
    if isinstance(default, bool):
        word = raw.strip().lower()
        if word not in _TRUE + _FALSE:
            raise SystemExit(f"{source} wants one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}, got {raw!r}")
        return word in _TRUE
    if isinstance(default, tuple):
        return tuple(x.strip() for x in raw.split(",") if x.strip())
    if isinstance(default, (int, float)):
        try:
            return parse_number(raw, type(default), *_bounds(flag))
        except ValueError as e:
            raise SystemExit(f"{source} {e}") from None
    return raw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting as a flag (`--max-batch 32`); image policy as `--image-max-bytes` etc."""
    for name, f in _SIMPLE.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=f"(env {ENV_PREFIX}{name.upper()}, default {f.default!r})")
    for name, f in _POLICY.items():
        parser.add_argument(f"--image-{name.replace('_', '-')}", dest=f"image_{name}", default=None, help=f"(env {ENV_PREFIX}IMAGE_{name.upper()})")
    parser.add_argument("--kafka-opt", action="append", default=[], metavar="KEY=VALUE", help="librdkafka option passed through (repeatable)")


def load(args: argparse.Namespace | None = None, env: dict | None = None, **overrides) -> Settings:
    """Defaults, then env, then flags, then keyword overrides (tests)."""
    env = os.environ if env is None else env
    flags = vars(args) if args is not None else {}
    base = Settings()
    values: dict = {}
    for name in _SIMPLE:
        value = _read(flags, env, name, f"{ENV_PREFIX}{name.upper()}", getattr(base, name))
        if value is not None:
            values[name] = value
    policy: dict = {}
    for name in _POLICY:
        value = _read(flags, env, f"image_{name}", f"{ENV_PREFIX}IMAGE_{name.upper()}", getattr(base.image_policy, name))
        if value is not None:
            policy[name] = value
    kafka = {k[len(KAFKA_ENV_PREFIX):].lower().replace("_", "."): v for k, v in env.items() if k.startswith(KAFKA_ENV_PREFIX)}
    try:
        kafka.update(key_values(flags.get("kafka_opt") or [], "--kafka-opt"))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    for key in KAFKA_CLIENT_BOOLS:
        if key in kafka and kafka[key].lower() not in ("true", "false"):
            raise SystemExit(f"Kafka option {key} wants true or false, got {kafka[key]!r}")
    values["image_policy"] = dataclasses.replace(base.image_policy, **policy)
    values["kafka"] = tuple(sorted(kafka.items()))
    values.update(overrides)
    return dataclasses.replace(base, **values)
