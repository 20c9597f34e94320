"""The library's errors, under one base class :class:`OpenExampleError`.

Who made the mistake decides the class:

- :class:`ConfigError`: the local caller or operator (a bad setting, argument or file);
  raised before anything is sent, the message names the key.
- :class:`ProtocolError`: the peer sent something this side refuses (decoding,
  validation, rule and table mods). It carries the wire ERROR's type and code, so a
  daemon answers with :meth:`ProtocolError.to_error` and keeps the session.
- :class:`PeerError`: the peer refused something this side sent (a received ERROR),
  raised at the local caller that asked.
"""

from __future__ import annotations

from openexample.v1 import openexample_pb2 as pb

# The code enum that goes with each error type (for names in messages and logs).
_CODE_ENUMS = {
    pb.ERROR_TYPE_HELLO_FAILED: pb.HelloFailedCode,
    pb.ERROR_TYPE_BAD_REQUEST: pb.BadRequestCode,
    pb.ERROR_TYPE_BAD_TENSOR: pb.BadTensorCode,
    pb.ERROR_TYPE_VIGILANCE_MOD_FAILED: pb.VigilanceModFailedCode,
    pb.ERROR_TYPE_TABLE_MOD_FAILED: pb.TableModFailedCode,
    pb.ERROR_TYPE_ROLE_REQUEST_FAILED: pb.RoleRequestFailedCode,
}

# ERROR carries at most this much of the offending message (as OpenFlow does).
ERROR_DATA_BYTES = 64


def error_name(error_type: int, code: int) -> str:
    """``"BAD_TENSOR/NOT_FINITE"`` style name of a (type, code) pair."""
    try:
        tname = pb.ErrorType.Name(error_type).removeprefix("ERROR_TYPE_")
    except ValueError:
        return f"{error_type}/{code}"
    enum = _CODE_ENUMS.get(error_type)
    try:
        cname = enum.Name(code) if enum is not None else str(code)
    except ValueError:
        cname = str(code)
    prefix = pb.ErrorType.Name(error_type).removeprefix("ERROR_TYPE_") + "_CODE_"
    return f"{tname}/{cname.removeprefix(prefix)}"


class OpenExampleError(Exception):
    """Base class of every error the OpenExample packages raise on purpose."""


class ConfigError(OpenExampleError, ValueError):
    """A configuration key, argument or value is wrong; the message names it."""


class ProtocolError(OpenExampleError):
    """A peer sent something this side refuses; maps 1:1 to a wire ERROR."""

    def __init__(self, error_type: int, code: int, text: str, xid: int = 0) -> None:
        self.error_type = error_type
        self.code = code
        self.text = text
        self.xid = xid
        super().__init__(f"{error_name(error_type, code)}: {text}")

    @property
    def name(self) -> str:
        return error_name(self.error_type, self.code)

    def with_xid(self, xid: int) -> ProtocolError:
        """The same error, attributed to the message with ``xid``."""
        self.xid = xid
        return self

    def to_error(self, data: bytes = b"") -> pb.Error:
        return pb.Error(
            type=self.error_type,
            code=self.code,
            offending_xid=self.xid,
            text=self.text[:1024],
            data=data[:ERROR_DATA_BYTES],
        )

    @classmethod
    def from_error(cls, err: pb.Error) -> ProtocolError:
        """The exception a received ERROR stands for (to raise at the caller)."""
        return cls(err.type, err.code, err.text, err.offending_xid)


class PeerError(ProtocolError):
    """The peer refused what this side sent: a received ERROR, raised locally."""


def bad_request(code: int, text: str) -> ProtocolError:
    return ProtocolError(pb.ERROR_TYPE_BAD_REQUEST, code, text)


def bad_tensor(code: int, text: str) -> ProtocolError:
    return ProtocolError(pb.ERROR_TYPE_BAD_TENSOR, code, text)


def vigilance_mod_failed(code: int, text: str) -> ProtocolError:
    return ProtocolError(pb.ERROR_TYPE_VIGILANCE_MOD_FAILED, code, text)


def table_mod_failed(code: int, text: str) -> ProtocolError:
    return ProtocolError(pb.ERROR_TYPE_TABLE_MOD_FAILED, code, text)


def hello_failed(code: int, text: str) -> ProtocolError:
    return ProtocolError(pb.ERROR_TYPE_HELLO_FAILED, code, text)


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message in one line, for the one-line errors users see: the first
    line (TorchScript puts the cause on its last), without a repeated type name."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[-1] if "TorchScript interpreter" in lines[0] else lines[0]
    line = line.removeprefix(f"{type(exc).__name__}: ")
    return line if len(line) <= limit else line[: limit - 3] + "..."
