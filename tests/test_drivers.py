"""Drivers: export/dispatch, reports, ref proxies, registry, mock power and PySerial.

The serial tests run against a real pty pair made by socat and a real TCP echo server.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import termios
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import serial
import structlog.testing
from pydantic import ValidationError

from jumpstarter_exporter.config.models import ExporterConfig
from jumpstarter_exporter.drivers import composite, power, registry
from jumpstarter_exporter.drivers.base import (
    ByteStream,
    Driver,
    InvalidArguments,
    MemoryPipe,
    MethodNotFound,
    export,
    exportstream,
    grpc_status_for,
    invoke,
    invoke_streaming,
    memory_stream_pair,
)
from jumpstarter_exporter.drivers.serial import PySerial
from jumpstarter_exporter.errors import (
    ConfigError,
    DeviceBusy,
    DeviceError,
    DeviceUnavailable,
    DriverCallError,
)
from jumpstarter_exporter.wire.values import from_value, to_value

CLIENT = "jumpstarter.dev/client"
NAME = "jumpstarter.dev/name"


def run(coro: Any, timeout: float = 20) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(agen: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in agen]


class Calc(Driver):
    client = "tests.CalcClient"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closed_gen = False

    @export
    def add(self, a: int, b: int = 10) -> int:
        return a + b

    @export
    async def scale(self, x: float, factor: float) -> float:
        return x * factor

    @export
    def flag(self, value: bool) -> bool:
        return value

    @export
    def where(self) -> str:
        return threading.current_thread().name

    @export
    def count(self, n: int) -> Iterator[int]:
        try:
            yield from range(n)
        finally:
            self.closed_gen = True

    @export
    async def acount(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @export
    def boom(self) -> None:
        raise NotImplementedError("not here")

    @exportstream
    async def echo(self) -> AsyncIterator[ByteStream]:
        pipe = MemoryPipe()
        try:
            yield pipe
        finally:
            await pipe.aclose()

    def helper(self) -> None:
        """Not exported."""


# --- export / invoke ------------------------------------------------------------------------


def test_json_numbers_are_coerced_to_annotated_types() -> None:
    calc = Calc()
    result = run(invoke(calc, "add", [1.0, 2.0]))
    assert result == 3 and type(result) is int
    assert run(invoke(calc, "add", [5.0])) == 15
    assert run(invoke(calc, "scale", [2.0, 1.5])) == 3.0
    assert run(invoke(calc, "flag", [1.0])) is True
    assert run(collect(invoke_streaming(calc, "count", [3.0]))) == [0, 1, 2]
    assert run(collect(invoke_streaming(calc, "acount", [2.0]))) == [0, 1]


@pytest.mark.parametrize(
    ("method", "args", "text"),
    [
        ("add", [1.5], "invalid arguments for add: a: Input should be a valid integer"),
        ("add", [], "invalid arguments for add: a: Missing required argument"),
        ("add", [1, 2, 3], "invalid arguments for add: argument 3: Unexpected positional"),
        ("scale", ["x", 1], "invalid arguments for scale: x: Input should be a valid number"),
    ],
)
def test_bad_arguments_are_invalid_argument(method: str, args: list[Any], text: str) -> None:
    with pytest.raises(InvalidArguments) as info:
        run(invoke(Calc(), method, args))
    code, details = grpc_status_for(info.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(text)
    assert "Calc object" not in details  # no input echo


def test_sync_methods_run_in_a_worker_thread() -> None:
    calc = Calc()
    assert run(invoke(calc, "where", [])) != threading.main_thread().name

    # leaving a sync stream early closes its generator
    async def first() -> int:
        agen = invoke_streaming(calc, "count", [100])
        item = await agen.__anext__()
        await agen.aclose()
        return item

    assert run(first()) == 0
    assert calc.closed_gen


@pytest.mark.parametrize(
    ("method", "kind", "text"),
    [
        ("nothing", "call", "method nothing not found on driver"),
        ("nothing", "stream", "method nothing not found on driver"),
        ("helper", "call", "method helper missing marker marker_drivercall"),
        ("count", "call", "method count missing marker marker_drivercall"),
        ("add", "streaming", "method add missing marker marker_streamingdrivercall"),
        ("add", "stream", "method add missing marker marker_streamcall"),
        ("echo", "call", "method echo missing marker marker_drivercall"),
        ("uuid", "call", "method uuid missing marker marker_drivercall"),
    ],
)
def test_lookup_errors_use_upstream_texts(method: str, kind: Any, text: str) -> None:
    with pytest.raises(MethodNotFound) as info:
        Calc().lookup(method, kind)
    assert str(info.value) == text
    assert grpc_status_for(info.value) == (grpc.StatusCode.NOT_FOUND, text)


def test_lookup_errors_through_invoke() -> None:
    with pytest.raises(MethodNotFound, match=r"^method count missing marker marker_drivercall$"):
        run(invoke(Calc(), "count", []))
    with pytest.raises(MethodNotFound, match=r"^method add missing marker"):
        run(collect(invoke_streaming(Calc(), "add", [])))


def test_exportstream_yields_a_byte_stream() -> None:
    async def go() -> bytes:
        async with Calc().lookup("echo", "stream")() as stream:
            assert isinstance(stream, ByteStream)
            await stream.write(b"abc")
            return await stream.read()

    assert run(go()) == b"abc"


@pytest.mark.parametrize(
    ("exc", "code", "details"),
    [
        (NotImplementedError("nope"), grpc.StatusCode.UNIMPLEMENTED, "nope"),
        (ValueError("bad"), grpc.StatusCode.INVALID_ARGUMENT, "bad"),
        (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED, "TimeoutError"),
        (DeviceUnavailable("gone"), grpc.StatusCode.UNAVAILABLE, "gone"),
        (ConnectionResetError("reset"), grpc.StatusCode.UNAVAILABLE, "reset"),
        (DeviceBusy("busy"), grpc.StatusCode.RESOURCE_EXHAUSTED, "busy"),
        (DeviceError("broken"), grpc.StatusCode.INTERNAL, "broken"),
        (PermissionError("denied"), grpc.StatusCode.INTERNAL, "denied"),
        (DriverCallError("x"), grpc.StatusCode.UNKNOWN, "x"),
        (RuntimeError("bug"), grpc.StatusCode.UNKNOWN, "bug"),
        (
            RuntimeError("auth Bearer abc.def failed"),
            grpc.StatusCode.UNKNOWN,
            "auth Bearer <redacted> failed",
        ),
    ],
)
def test_grpc_status_for(exc: BaseException, code: grpc.StatusCode, details: str) -> None:
    assert grpc_status_for(exc) == (code, details)


def test_grpc_status_for_pydantic_error_is_one_line() -> None:
    with pytest.raises(ValidationError) as info:
        PySerial.Config.model_validate({"url": 1})
    code, details = grpc_status_for(info.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "\n" not in details and "url: Input should be a valid string" in details


def test_method_errors_map_through_invoke() -> None:
    with pytest.raises(NotImplementedError) as info:
        run(invoke(Calc(), "boom", []))
    assert grpc_status_for(info.value) == (grpc.StatusCode.UNIMPLEMENTED, "not here")


# --- memory pipes ---------------------------------------------------------------------------


def test_memory_pipe_is_bounded_and_ends() -> None:
    async def go() -> None:
        pipe = MemoryPipe(limit=4)
        writer = asyncio.create_task(pipe.write(b"abcdefghij"))
        await asyncio.sleep(0.05)
        assert not writer.done() and pipe.buffered == 4  # back-pressure
        got = b""
        while len(got) < 10:
            got += await pipe.read(3)
        await writer
        assert got == b"abcdefghij"
        await pipe.write(b"tail")
        await pipe.send_eof()
        assert await pipe.read() == b"tail"
        assert await pipe.read() == b""
        with pytest.raises(BrokenPipeError):
            await pipe.write(b"more")
        await pipe.aclose()
        assert await pipe.read() == b""

    run(go())


def test_memory_pipe_close_wakes_a_blocked_writer() -> None:
    async def go() -> None:
        pipe = MemoryPipe(limit=1)
        writer = asyncio.create_task(pipe.write(b"xyz"))
        await asyncio.sleep(0.01)
        await pipe.aclose()
        with pytest.raises(BrokenPipeError):
            await writer

    run(go())


def test_memory_stream_pair_is_crossed() -> None:
    async def go() -> None:
        a, b = memory_stream_pair()
        await a.write(b"to b")
        await b.write(b"to a")
        assert await b.read() == b"to b"
        assert await a.read() == b"to a"
        await a.send_eof()
        assert await b.read() == b""
        await b.write(b"still open")
        assert await a.read() == b"still open"

    run(go())


# --- power ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [power.MockPower, power.SyncMockPower])
def test_mock_power(cls: type[Driver]) -> None:
    driver = cls()
    driver.name = "pdu"
    assert driver.client == "jumpstarter_driver_power.client.PowerClient"
    assert driver.state is None  # type: ignore[attr-defined]
    with structlog.testing.capture_logs() as logs:
        assert run(invoke(driver, "on", [])) is None
        assert driver.state is True  # type: ignore[attr-defined]
        assert run(invoke(driver, "off", [])) is None
        assert driver.state is False  # type: ignore[attr-defined]
        run(invoke(driver, "cycle", [0]))
        assert driver.state is True  # type: ignore[attr-defined]
    assert [(e["event"], e["log_level"], e["driver"]) for e in logs] == [
        ("power on", "info", "pdu"),
        ("power off", "info", "pdu"),
        ("power off", "info", "pdu"),
        ("power on", "info", "pdu"),
    ]
    readings = run(collect(invoke_streaming(driver, "read", [])))
    assert [from_value(to_value(r)) for r in readings] == [
        {"voltage": 0.0, "current": 0.0},
        {"voltage": 5.0, "current": 2.0},
    ]
    with pytest.raises(MethodNotFound, match=r"^method rescue not found on driver$"):
        driver.lookup("rescue", "call")
    with pytest.raises(InvalidArguments, match="wait: Input should be greater than or equal"):
        run(invoke(driver, "cycle", [-1.0]))


def test_driver_log_level_filters() -> None:
    with structlog.testing.capture_logs() as logs:
        run(invoke(power.MockPower({"log_level": "WARNING"}), "on", []))
        run(invoke(power.MockPower({"log_level": "info"}), "on", []))
    assert [e["event"] for e in logs] == ["power on"]
    with pytest.raises(ValidationError):
        power.MockPower({"log_level": "LOUD"})
    with pytest.raises(ValidationError):
        power.MockPower({"voltage": 5})


# --- tree, reports, proxies -----------------------------------------------------------------


def _config(export: dict[str, Any], **top: Any) -> ExporterConfig:
    return ExporterConfig.model_validate({"metadata": {"name": "e"}, "export": export, **top})


TREE = {
    "power": {
        "type": "jumpstarter_driver_power.driver.MockPower",
        "description": "main power",
        "methods_description": {"on": "switch it on"},
    },
    "group": {
        "children": {
            "serial": {
                "type": "jumpstarter_driver_pyserial.driver.PySerial",
                "config": {"url": "loop://", "baudrate": 9600},
            },
            "sync": {"type": "jumpstarter_exporter.drivers.power.SyncMockPower"},
        }
    },
    "alias": {"ref": "power"},
    "galias": {"ref": "group"},
}


def test_reports_depth_first_with_labels() -> None:
    root = registry.build_tree(_config(TREE, description="the board"))
    rows = [(d, p, n, d.report(p, n)) for d, p, n in root.walk()]
    names = [n for _, _, n, _ in rows]
    assert names == [None, "power", "group", "serial", "sync", "alias", "galias", "serial", "sync"]

    by_name = {n: (d, p, r) for d, p, n, r in rows[:6]}
    root_report = rows[0][3]
    assert root_report.uuid == root.uuid
    assert not root_report.HasField("parent_uuid")
    assert dict(root_report.labels) == {
        CLIENT: "jumpstarter_driver_composite.client.CompositeClient"
    }
    assert root_report.description == "the board"

    power_driver, parent, report = by_name["power"]
    assert parent == root.uuid and report.parent_uuid == root.uuid
    assert dict(report.labels) == {
        CLIENT: "jumpstarter_driver_power.client.PowerClient",
        NAME: "power",
    }
    assert report.description == "main power"
    assert dict(report.methods_description) == {"on": "switch it on"}

    group, _, group_report = by_name["group"]
    assert not group_report.HasField("description")
    serial, serial_parent, serial_report = by_name["serial"]
    assert serial_parent == group.uuid
    assert serial_report.labels[CLIENT] == "jumpstarter_driver_pyserial.client.PySerialClient"
    assert isinstance(serial, PySerial) and serial.config.baudrate == 9600
    assert serial.name == "serial"

    # the proxy reports the target's uuid and labels under its own name
    _, _, alias_report = by_name["alias"]
    assert alias_report.uuid == power_driver.uuid
    assert dict(alias_report.labels) == {
        CLIENT: "jumpstarter_driver_power.client.PowerClient",
        NAME: "alias",
    }
    assert alias_report.description == "main power"
    assert dict(alias_report.methods_description) == {"on": "switch it on"}
    # a group alias repeats the group's subtree (as upstream), parented on the group's uuid
    assert rows[6][3].uuid == group.uuid
    assert rows[7][1] == group.uuid and rows[7][3].uuid == serial.uuid

    # uuids are fresh per build
    assert registry.build_tree(_config(TREE)).uuid != root.uuid
    assert len({d.uuid for d, _, _ in root.walk()}) == 5


def test_calls_through_a_proxy_reach_the_target() -> None:
    root = registry.build_tree(_config(TREE))
    index = {d.uuid: d for d, _, _ in root.walk()}  # what a session would build
    target = root.children["power"]
    proxy = root.children["alias"]
    assert isinstance(proxy, composite.RefProxy)
    run(invoke(proxy, "on", []))
    assert target.state is True  # type: ignore[attr-defined]
    run(invoke(index[target.uuid], "off", []))
    assert target.state is False  # type: ignore[attr-defined]
    assert run(collect(invoke_streaming(proxy, "read", [])))[1].voltage == 5.0
    with pytest.raises(MethodNotFound, match=r"^method nope not found on driver$"):
        proxy.lookup("nope", "call")


def test_registry_accepts_upstream_and_own_paths() -> None:
    pairs = {
        "jumpstarter_driver_power.driver.MockPower": power.MockPower,
        "jumpstarter_driver_power.driver.SyncMockPower": power.SyncMockPower,
        "jumpstarter_driver_pyserial.driver.PySerial": PySerial,
        "jumpstarter_driver_composite.driver.Composite": composite.Composite,
        "jumpstarter_exporter.drivers.power.MockPower": power.MockPower,
        "jumpstarter_exporter.drivers.power.SyncMockPower": power.SyncMockPower,
        "jumpstarter_exporter.drivers.serial.PySerial": PySerial,
        "jumpstarter_exporter.drivers.composite.Composite": composite.Composite,
    }
    for type_name, cls in pairs.items():
        assert registry.driver_class(type_name) is cls
    assert set(pairs) <= set(registry.known_types())
    assert composite.Composite.client == "jumpstarter_driver_composite.client.CompositeClient"
    assert PySerial.client == "jumpstarter_driver_pyserial.client.PySerialClient"
    # a typed Composite entry with children builds too
    root = registry.build_tree(
        _config(
            {
                "c": {
                    "type": "jumpstarter_driver_composite.driver.Composite",
                    "children": {"p": {"type": "jumpstarter_driver_power.driver.MockPower"}},
                }
            }
        )
    )
    assert isinstance(root.children["c"].children["p"], power.MockPower)


def test_unknown_type_is_a_config_error() -> None:
    config = _config({"grp": {"children": {"x": {"type": "acme.driver.Relay"}}}})
    with pytest.raises(ConfigError) as info:
        registry.build_tree(config)
    text = str(info.value)
    assert "export.grp.x.type: unknown driver type 'acme.driver.Relay'" in text
    assert "jumpstarter_driver_power.driver.MockPower" in text  # lists the known types
    assert info.value.problems == registry.validate(config)


def test_validate_reports_every_problem() -> None:
    config = _config(
        {
            "serial": {
                "type": "jumpstarter_driver_pyserial.driver.PySerial",
                "config": {"url": "/dev/ttyUSB0", "baudrate": "fast", "databits": 8},
            },
            "noconf": {"type": "jumpstarter_driver_pyserial.driver.PySerial"},
            "grp": {
                "children": {
                    "p": {"type": "jumpstarter_driver_power.driver.MockPower"},
                    "loop": {"ref": "grp"},
                }
            },
            "bad": {"type": "nope.Nope"},
        }
    )
    problems = registry.validate(config)
    assert problems[0].startswith("export.serial.config.baudrate: Input should be a valid integer")
    assert problems[1:] == [
        "export.serial.config.databits: Extra inputs are not permitted",
        "export.noconf.config: exactly one of `url` (a device path or pyserial URL) or "
        "`match` (udev keys, e.g. {ID_SERIAL_SHORT: ...}) is required",
        "export.grp.loop: ref 'grp' names an entry containing it",
        problems[-1],
    ]
    assert problems[-1].startswith("export.bad.type: unknown driver type 'nope.Nope' (known: ")
    assert registry.validate(_config(TREE)) == []
    # validation opens nothing: a missing device is not a config problem
    ok = _config({"s": {"type": "jumpstarter_driver_pyserial.driver.PySerial",
                        "config": {"url": "/nonexistent/tty"}}})  # fmt: skip
    assert registry.validate(ok) == []
    assert isinstance(registry.build_tree(ok).children["s"], PySerial)


# --- PySerial -------------------------------------------------------------------------------


def test_pyserial_config() -> None:
    cfg = PySerial.Config.model_validate({"url": "loop://"})
    assert (cfg.baudrate, cfg.check_present, cfg.cps, cfg.disable_hupcl) == (
        115200,
        True,
        None,
        False,
    )
    with pytest.raises(ValidationError):
        PySerial.Config.model_validate({})
    with pytest.raises(ValidationError):
        PySerial.Config.model_validate({"url": "loop://", "baudrate": 0})


def test_pyserial_loop_echo_and_close() -> None:
    async def go() -> None:
        port = PySerial({"url": "loop://"})
        async with port.lookup("connect", "stream")() as stream:
            await stream.write(b"hello\r\n")
            assert await stream.read() == b"hello\r\n"
            await invoke(port, "set_dtr", [True])
            await invoke(port, "set_rts", [0.0])
            pending = asyncio.create_task(stream.read())
            await asyncio.sleep(0.01)
            assert await invoke(port, "close", []) is None  # ends open connections
            assert await pending == b""
        await port.aclose()

    run(go())


def test_pyserial_cps_throttles_writes() -> None:
    async def go() -> float:
        port = PySerial({"url": "loop://", "cps": 100})
        loop = asyncio.get_running_loop()
        async with port.lookup("connect", "stream")() as stream:
            start = loop.time()
            await stream.write(b"0123456789")
            elapsed = loop.time() - start
            got = b""
            while len(got) < 10:
                got += await stream.read()
            assert got == b"0123456789"
            return elapsed

    assert run(go()) >= 0.09


def test_pyserial_missing_device_is_unavailable(tmp_path: Path) -> None:
    missing = str(tmp_path / "ttyUSB9")
    port = PySerial({"url": missing})  # construction never touches the device

    async def go() -> None:
        with pytest.raises(
            DeviceUnavailable, match=re.escape(f"serial device {missing} is unavailable")
        ):
            async with port.lookup("connect", "stream")():
                pass
        with pytest.raises(
            DeviceUnavailable, match=re.escape(f"serial device {missing} is not present")
        ):
            await port.check()
        await PySerial({"url": missing, "check_present": False}).check()
        with pytest.raises(DeviceUnavailable, match=re.escape(missing)):
            await invoke(port, "set_dtr", [True])

    run(go())
    code, details = grpc_status_for(DeviceUnavailable(f"serial device {missing} x"))
    assert code == grpc.StatusCode.UNAVAILABLE and missing in details


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    a, b = str(tmp_path / "A"), str(tmp_path / "B")
    proc = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(250):
            if os.path.exists(a) and os.path.exists(b):
                break
            if proc.poll() is not None:
                pytest.fail("socat exited")
            subprocess.run(["sleep", "0.02"], check=True)
        else:
            pytest.fail("socat did not create the pty links")
        yield a, b, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_pyserial_pty_both_ways_and_bulk(pty_pair: tuple[str, str, Any]) -> None:
    a, b, _ = pty_pair
    payload = os.urandom(4 << 20)  # every byte value: checks the line is raw, 8-bit clean

    # leave the receiving tty "cooked" (8th bit stripped): opening must make it raw
    fd = os.open(b, os.O_RDWR | os.O_NOCTTY)
    try:
        attrs = termios.tcgetattr(fd)
        attrs[0] |= termios.ISTRIP | termios.IXON
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    finally:
        os.close(fd)

    async def go() -> None:
        port_a, port_b = PySerial({"url": a}), PySerial({"url": b, "baudrate": 9600})
        await port_a.check()
        async with (
            port_a.lookup("connect", "stream")() as sa,
            port_b.lookup("connect", "stream")() as sb,
        ):
            await sa.write(b"ping\n")
            assert await sb.read() == b"ping\n"
            await sb.write(b"\x00\x11\x13\xff")
            got = b""
            while len(got) < 4:
                got += await sa.read()
            assert got == b"\x00\x11\x13\xff"

            async def drain() -> tuple[str, int]:
                digest, count = hashlib.sha256(), 0
                while count < len(payload):
                    chunk = await sb.read()
                    assert chunk, "unexpected EOF"
                    digest.update(chunk)
                    count += len(chunk)
                return digest.hexdigest(), count

            writer = asyncio.create_task(sa.write(payload))
            await asyncio.sleep(0.2)
            assert not writer.done()  # nobody reads B: the write waits (back-pressure)
            digest, count = await drain()
            await writer
            assert count == len(payload)
            assert digest == hashlib.sha256(payload).hexdigest()
        await port_a.aclose()
        await port_b.aclose()

    run(go(), timeout=60)


def test_pyserial_pty_eof_when_the_far_end_goes_away(pty_pair: tuple[str, str, Any]) -> None:
    a, _, proc = pty_pair

    async def go() -> None:
        port = PySerial({"url": a})
        async with port.lookup("connect", "stream")() as stream:
            await invoke(port, "set_dtr", [False])  # a separate handle; ptys ignore DTR
            # another opener (pyserial) leaves the tty at VMIN=0, where an empty read means
            # "no data", not hang-up: the stream must keep waiting
            await asyncio.to_thread(lambda: serial.serial_for_url(a).close())
            reader = asyncio.create_task(stream.read())
            await asyncio.sleep(0.1)
            assert not reader.done()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(reader, 5) == b""
            with pytest.raises(BrokenPipeError):
                await stream.write(b"x")
        # socat removed its links: reopening says which device is missing
        await asyncio.to_thread(proc.wait)
        with pytest.raises(DeviceUnavailable, match=re.escape(a)):
            async with port.lookup("connect", "stream")():
                pass

    run(go())


def test_pyserial_disable_hupcl(pty_pair: tuple[str, str, Any]) -> None:
    a, b, _ = pty_pair

    def hupcl(path: str) -> bool:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            return bool(termios.tcgetattr(fd)[2] & termios.HUPCL)
        finally:
            os.close(fd)

    async def go() -> None:
        for path in (a, b):  # start from HUPCL set, as on a fresh USB serial port
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            attrs = termios.tcgetattr(fd)
            attrs[2] |= termios.HUPCL
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
            os.close(fd)
        async with PySerial({"url": a}).lookup("connect", "stream")():
            assert hupcl(a)
        async with PySerial({"url": b, "disable_hupcl": True}).lookup("connect", "stream")():
            assert not hupcl(b)

    run(go())


def test_pyserial_socket_url_through_threads() -> None:
    async def go() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)  # pyserial discards what arrives before it is fully open
            writer.write(b"hi")
            await writer.drain()
            writer.close()

        payload = os.urandom(64 << 10)  # pyserial's socket:// reads byte by byte
        async with await asyncio.start_server(echo, "127.0.0.1", 0) as server:
            host, tcp_port = server.sockets[0].getsockname()[:2]
            port = PySerial({"url": f"socket://{host}:{tcp_port}"})
            async with port.lookup("connect", "stream")() as stream:
                writer = asyncio.create_task(stream.write(payload))
                got = bytearray()
                while len(got) < len(payload):
                    chunk = await stream.read()
                    assert chunk
                    got += chunk
                await writer
                assert bytes(got) == payload
            await port.aclose()

        async with await asyncio.start_server(hello, "127.0.0.1", 0) as server:
            host, tcp_port = server.sockets[0].getsockname()[:2]
            port = PySerial({"url": f"socket://{host}:{tcp_port}"})
            async with port.lookup("connect", "stream")() as stream:
                await stream.write(b"?")
                got = b""
                while chunk := await stream.read():
                    got += chunk
                assert got == b"hi"  # then b"": the peer closed, end of stream
                assert await stream.read() == b""

    run(go())


def test_pyserial_unreachable_url_is_unavailable() -> None:
    async def go() -> None:
        port = PySerial({"url": "socket://127.0.0.1:1"})
        with pytest.raises(DeviceUnavailable, match=re.escape("socket://127.0.0.1:1")):
            async with port.lookup("connect", "stream")():
                pass

    run(go())
