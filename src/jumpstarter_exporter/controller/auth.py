"""Who is calling: bearer token + ``jumpstarter-*`` metadata → an identity, or a clear refusal.

Every ControllerService and ClientService call carries ``jumpstarter-kind``,
``jumpstarter-namespace``, ``jumpstarter-name`` and ``authorization: Bearer <token>``
(protocol-facts §2.1). The token must belong to exactly the object the metadata names, and
the call must be one that kind may make. Refusals name what was wrong, never the token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import grpc

from jumpstarter_exporter.controller.store import Store
from jumpstarter_exporter.controller.tokens import token_hash

Kind = Literal["Exporter", "Client"]


@dataclass(frozen=True)
class Identity:
    kind: Kind
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind.lower()} {self.namespace}/{self.name}"


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def bearer(metadata: dict[str, str]) -> str:
    value = metadata.get("authorization")
    if not value:
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "missing authorization metadata")
    if value[:7].lower() != "bearer " or not value[7:].strip():
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "authorization is not 'Bearer <token>'")
    return value[7:].strip()


def authenticate(store: Store, metadata: dict[str, str], allowed: set[Kind]) -> Identity:
    token = bearer(metadata)
    for key in ("jumpstarter-kind", "jumpstarter-namespace", "jumpstarter-name"):
        if not metadata.get(key):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"missing metadata: {key}")
    kind, namespace, name = (
        metadata["jumpstarter-kind"],
        metadata["jumpstarter-namespace"],
        metadata["jumpstarter-name"],
    )
    th = token_hash(token)
    owner: Identity | None = None
    if (exporter := store.exporter_by_token(th)) is not None:
        owner = Identity("Exporter", exporter.namespace, exporter.name)
    elif (client := store.client_by_token(th)) is not None:
        owner = Identity("Client", client.namespace, client.name)
    if owner is None:
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "invalid token")
    if (owner.kind, owner.namespace, owner.name) != (kind, namespace, name):
        raise Refused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"permission denied: the token does not belong to {kind.lower()} {namespace}/{name}",
        )
    if owner.kind not in allowed:
        need = " or ".join(sorted(k.lower() for k in allowed))
        raise Refused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"permission denied: {owner} may not make this call (needs a {need})",
        )
    return owner
