import argparse

import pytest

from common import settings


def _parse(argv):
    p = argparse.ArgumentParser()
    settings.add_arguments(p)
    return p.parse_args(argv)


def test_defaults_work_locally():
    s = settings.load(env={})
    assert s.bootstrap_servers.startswith("127.0.0.1") and s.max_batch > 0 and s.kafka == ()


def test_flags_override_env_and_kafka_passthrough():
    env = {"PRODCAT_MAX_BATCH": "16", "PRODCAT_MAX_DELAY_MS": "7.5", "PRODCAT_KAFKA__SASL_MECHANISM": "PLAIN",
           "PRODCAT_IMAGE_ALLOWED_HOSTS": "a.com, b.com", "PRODCAT_IMAGE_ALLOW_PRIVATE_ADDRESSES": "true"}
    s = settings.load(_parse(["--max-batch", "32", "--kafka-opt", "security.protocol=SASL_SSL"]), env=env)
    assert s.max_batch == 32 and s.max_delay_ms == 7.5
    assert s.kafka_options() == {"sasl.mechanism": "PLAIN", "security.protocol": "SASL_SSL"}
    assert s.image_policy.allowed_hosts == ("a.com", "b.com") and s.image_policy.allow_private_addresses is True


def test_settings_are_frozen():
    s = settings.load(env={})
    with pytest.raises(Exception):
        s.max_batch = 3


def test_bad_kafka_opt_is_a_clear_error():
    with pytest.raises(SystemExit, match="--kafka-opt wants KEY=VALUE, got 'nonsense'"):
        settings.load(_parse(["--kafka-opt", "nonsense"]), env={})
    with pytest.raises(SystemExit, match="--kafka-opt wants KEY=VALUE, got '=1'"):  # no key: was passed on as ""
        settings.load(_parse(["--kafka-opt", "=1"]), env={})


@pytest.mark.parametrize("env, argv, message", [
    ({"PRODCAT_MAX_BATCH": "32x"}, [], "PRODCAT_MAX_BATCH wants an integer ≥ 1, got '32x'"),
    ({}, ["--max-delay-ms", "ten"], "--max-delay-ms wants a number ≥ 0, got 'ten'"),
    ({"PRODCAT_IMAGE_MAX_BYTES": "10MB"}, [], "PRODCAT_IMAGE_MAX_BYTES wants an integer ≥ 1, got '10MB'"),
    # a typo in a yes/no setting was read as "no": here it would quietly keep private addresses refused
    ({"PRODCAT_IMAGE_ALLOW_PRIVATE_ADDRESSES": "ture"}, [], "PRODCAT_IMAGE_ALLOW_PRIVATE_ADDRESSES wants one of"),
    ({"PRODCAT_IMAGE_ALLOW_PRIVATE_ADDRESSES": "true"}, ["--image-allow-private-addresses", "maybe"],
     "--image-allow-private-addresses wants one of"),
    # the right type, out of range: a 0-item batch stopped the inference worker with BatchQueue's traceback
    ({"PRODCAT_MAX_BATCH": "0"}, [], "PRODCAT_MAX_BATCH wants an integer ≥ 1, got '0'"),
    ({}, ["--max-delay-ms", "-5"], "--max-delay-ms wants a number ≥ 0, got '-5'"),
    ({"PRODCAT_METRICS_PORT": "70000"}, [], "PRODCAT_METRICS_PORT wants an integer 0–65535, got '70000'"),
    ({"PRODCAT_MODEL_RELOAD_S": "nan"}, [], "PRODCAT_MODEL_RELOAD_S wants a number ≥ 0, got 'nan'"),
])
def test_a_setting_of_the_wrong_type_stops_the_process_with_one_line_naming_it(env, argv, message):
    with pytest.raises(SystemExit, match=message):
        settings.load(_parse(argv), env=env)
    assert settings.load(env={"PRODCAT_IMAGE_ALLOW_PRIVATE_ADDRESSES": "Off"}).image_policy.allow_private_addresses is False
    assert settings.load(env={"PRODCAT_METRICS_PORT": "0", "PRODCAT_MAX_DELAY_MS": "0"}).max_delay_ms == 0.0


def test_kafka_options_the_python_client_types_reach_it_as_booleans():
    from confluent_kafka import Producer

    from common import kafka

    s = settings.load(env={"PRODCAT_KAFKA__DELIVERY_REPORT_ONLY_ERROR": "False"})
    conf = kafka.producer_config(s, "test")
    assert conf["delivery.report.only.error"] is False
    Producer(conf)  # the string "false" here was a TypeError at worker start
    assert settings.load(_parse(["--kafka-opt", "delivery.report.only.error=TRUE"]), env={}).kafka_options() == {
        "delivery.report.only.error": True}
    # settings given in code (LocalStack's overrides) skip load's check: the value's case still does not matter
    assert settings.load(env={}, kafka=(("delivery.report.only.error", "True"),)).kafka_options() == {
        "delivery.report.only.error": True}
    with pytest.raises(SystemExit, match="true or false"):
        settings.load(env={"PRODCAT_KAFKA__DELIVERY_REPORT_ONLY_ERROR": "no"})


def test_cuda_options_from_env_or_flag_reach_a_worker_process_intact(tmp_path):
    from prodcat.stack import LocalStack

    assert settings.load(env={"PRODCAT_CUDA_OPTIONS": "cudnn_conv_algo_search=HEURISTIC"}).cuda_options == (
        "cudnn_conv_algo_search=HEURISTIC",)
    s = settings.load(_parse(["--cuda-options", "a=1, b=2"]), env={})
    assert s.cuda_options == ("a=1", "b=2")
    env = LocalStack(workdir=str(tmp_path)).worker_env("models/x", 9999, cuda_options=s.cuda_options)  # what a worker process reads
    assert env["PRODCAT_CUDA_OPTIONS"] == "a=1,b=2" and settings.load(env=env).cuda_options == ("a=1", "b=2")


def test_settings_made_in_code_get_the_checks_env_vars_and_flags_get():
    # a test, the bench or a stack builds its workers' settings in code: max_batch=0 failed deep in a worker at
    # start, max_delay_ms=nan never released a batch, an image limit of 0 refused every photo
    from common.images import FetchPolicy

    for overrides, message in (({"max_batch": 0}, "setting max_batch wants an integer ≥ 1, got 0"),
                               ({"max_delay_ms": float("nan")}, "setting max_delay_ms wants a number ≥ 0, got nan"),
                               ({"metrics_port": 70_000}, "setting metrics_port wants an integer 0–65535, got 70000"),
                               ({"poll_batch": "256"}, "setting poll_batch wants an integer, got '256'"),
                               ({"image_policy": FetchPolicy(max_bytes=0)}, "setting image_max_bytes wants an integer ≥ 1, got 0")):
        with pytest.raises(ValueError) as e:
            settings.load(env={}, **overrides)
        assert str(e.value) == message
    assert settings.load(env={}, max_delay_ms=0, metrics_port=0).max_delay_ms == 0  # an int for a float is fine
