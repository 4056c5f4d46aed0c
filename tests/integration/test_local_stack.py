"""The local stack the demo, the benchmark and the tests stand on: each service on a port of its own, and a
service counted as up only when it answers as itself."""
from __future__ import annotations

import socket

import pytest

from prodcat.stack import LocalStack, free_ports


@pytest.mark.parametrize("service", ["redis", "broker"])
def test_a_port_another_process_holds_is_not_taken_for_the_service(tmp_path, service):
    # bench's naive stage once stopped on `redis.exceptions.TimeoutError` at its first HSET: something that was not
    # Redis held the port the stack had picked, and accepting a connection passed for Redis being up
    assert len(set(free_ports(64))) == 64
    with socket.socket() as impostor:
        impostor.bind(("127.0.0.1", 0))
        impostor.listen()
        stack = LocalStack(str(tmp_path / "stack"))
        setattr(stack, f"{service}_port", impostor.getsockname()[1])
        try:
            with pytest.raises(RuntimeError, match="(?i)address (already )?in use"):
                stack.start_redis() if service == "redis" else stack.start_broker()
        finally:
            stack.close()
