"""Uploaded models (POST /models): their records in Redis and their keys in storage
(docs/design.md "Uploaded models").

An upload is one hash ``featuremaps:model:<id>`` (architecture, sha256, bytes, name, format,
key, owner, created_at) and a member of its owner's set ``featuremaps:models:<owner>``. It
does not expire: it stays until its owner deletes it. The id is derived from the owner and
the file's SHA-256, so the same file uploaded again by the same token is the same model, and
its object is ``models/<id>/<sha256>.<ext>``: content-addressed within an owner, never shared
with another (whose delete would take it away). Another owner's id reads as unknown.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from redis import Redis

from shared.errors import NotFound
from shared.options import is_upload_id
from shared.records import PREFIX, now_iso, text

MODEL_KEY_PREFIX = "models/"
_EXTENSIONS = {"safetensors": "safetensors", "pytorch": "pt"}


class ModelNotFound(NotFound):
    def __init__(self, model_id: str) -> None:
        super().__init__(f"no uploaded model with id {model_id!r} (unknown, deleted, or not yours)")


@dataclass(frozen=True)
class UploadedModel:
    id: str
    owner: str
    architecture: str
    sha256: str
    bytes: int
    name: str
    format: str  # "safetensors" or "pytorch"
    key: str
    created_at: str

    def document(self) -> dict:
        """The public document (POST /models's answer, GET /models's entries)."""
        return {
            "id": self.id,
            "architecture": self.architecture,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "name": self.name,
            "format": self.format,
            "created_at": self.created_at,
        }

    def weights_identity(self) -> dict:
        """What manifests, captions and the reuse digest say about these weights."""
        return {
            "name": "upload",
            "id": self.id,
            "sha256": self.sha256,
            "label": self.name or self.id,
        }


def model_id(owner: str, sha256: str) -> str:
    return hashlib.sha256(f"{owner}\0{sha256}".encode()).hexdigest()[:24]


def model_object_key(model: str, sha256: str, fmt: str) -> str:
    return f"{MODEL_KEY_PREFIX}{model}/{sha256}.{_EXTENSIONS[fmt]}"


class ModelStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    @staticmethod
    def key(model: str) -> str:
        return f"{PREFIX}:model:{model}"

    @staticmethod
    def owner_key(owner: str) -> str:
        return f"{PREFIX}:models:{owner}"

    def new(self, owner: str, *, architecture: str, sha256: str, size: int, name: str, fmt: str):
        """The record an upload of these bytes by ``owner`` makes (not yet saved)."""
        identifier = model_id(owner, sha256)
        return UploadedModel(
            id=identifier,
            owner=owner,
            architecture=architecture,
            sha256=sha256,
            bytes=size,
            name=name,
            format=fmt,
            key=model_object_key(identifier, sha256, fmt),
            created_at=now_iso(),
        )

    def save(self, model: UploadedModel) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key(model.id), mapping={k: str(v) for k, v in asdict(model).items()})
            pipe.sadd(self.owner_key(model.owner), model.id)
            pipe.execute()

    def get(self, model: str, *, owner: str | None) -> UploadedModel:
        """The upload ``model`` of ``owner`` (None: of anyone, for the worker that loads it)."""
        raw = self.redis.hgetall(self.key(model)) if is_upload_id(model) else {}
        if not raw:
            raise ModelNotFound(model)
        data = {text(k): text(v) for k, v in raw.items()}
        if owner is not None and data["owner"] != owner:
            raise ModelNotFound(model)
        return UploadedModel(**{**data, "bytes": int(data["bytes"])})

    def list(self, owner: str) -> list[UploadedModel]:
        ids = sorted(text(m) for m in self.redis.smembers(self.owner_key(owner)))
        models = []
        for model in ids:
            try:
                models.append(self.get(model, owner=owner))
            except ModelNotFound:
                continue  # deleted between the two reads
        return sorted(models, key=lambda m: m.created_at)

    def delete(self, model: UploadedModel) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.key(model.id))
            pipe.srem(self.owner_key(model.owner), model.id)
            pipe.execute()
