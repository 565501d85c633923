"""Server reflection, so grpcurl lists and describes every service, method, message and enum.

grpc_reflection answers ``file_containing_symbol`` with the descriptor pool's
``FindFileContainingSymbol``. protobuf's default (upb) pool resolves services, messages,
enums and fields there, but not methods (``pkg.Service.Method``, what ``grpcurl describe``
asks for a method) nor enum values named inside their enum (``pkg.Enum.VALUE``, how grpcurl
names them), so both got NOT_FOUND. The pool handed to grpc_reflection answers those with
the file of their service or enum and leaves everything else to protobuf's pool.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection

SERVICE_NAME: str = reflection.SERVICE_NAME


class MemberResolvingPool:
    """A descriptor pool whose ``FindFileContainingSymbol`` also resolves methods and enum
    values by their full names."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:
        try:
            found: FileDescriptor = self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            found = self._file_of_member(symbol)
        return found

    def _file_of_member(self, symbol: str) -> FileDescriptor:
        """The file of a method (``pkg.Service.Method``) or enum value (``pkg.Enum.VALUE``)."""
        with contextlib.suppress(KeyError):
            method: FileDescriptor = self._pool.FindMethodByName(symbol).containing_service.file
            return method
        parent, _, name = symbol.rpartition(".")
        with contextlib.suppress(KeyError):
            enum = self._pool.FindEnumTypeByName(parent)
            if name in enum.values_by_name:
                enum_file: FileDescriptor = enum.file
                return enum_file
        raise KeyError(f"no symbol {symbol!r} in the descriptor pool")

    def __getattr__(self, name: str) -> Any:
        """Every other lookup (files by name, messages, extensions) goes to the pool."""
        return getattr(self._pool, name)


def enable(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection for ``service_names`` (and reflection itself) on ``server``."""
    reflection.enable_server_reflection(
        (*service_names, SERVICE_NAME),
        server,
        pool=MemberResolvingPool(descriptor_pool.Default()),
    )
