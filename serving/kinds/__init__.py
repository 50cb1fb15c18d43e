"""The kinds of model the gateway serves, registered in one place.

A version's kind is its card's ``kind`` (:attr:`contract.repository.ModelVersion.kind`);
the core runs each request through its kind's pipeline (serving/kinds/base.py). A new
kind is a module with a :class:`ModelKind` subclass and one :func:`register` call; the
V2 endpoints (REST and gRPC) then serve it with no other change.
"""

from __future__ import annotations

from serving.errors import InvalidInput
from serving.kinds.base import ModelKind, Prepared
from serving.kinds.image import ImageClassification
from serving.kinds.text import TextClassification

KINDS: dict[str, ModelKind] = {}


def register(kind: ModelKind) -> ModelKind:
    KINDS[kind.name] = kind
    return kind


def get(name: str) -> ModelKind:
    try:
        return KINDS[name]
    except KeyError:
        raise InvalidInput(f"no model kind {name!r} is registered; kinds: {sorted(KINDS)}") from None


register(TextClassification())
register(ImageClassification())

__all__ = ["KINDS", "ModelKind", "Prepared", "get", "register"]
