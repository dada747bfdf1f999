"""The offline teacher cache: what each teacher said about each utterance, stored once.

Layout of a cache folder::

    manifest.json                 identity of every teacher, its settings, the data, every shard
    <teacher>/shard-00000.safetensors   tensors named "<utterance id>/<signal>"

A teacher's entry in the manifest records the model (its folder and the sha256 of its weights),
the settings it was run with (layers kept, top-k...; hashed), the data's fingerprint and, per shard,
its file, sha256 and utterance ids. :class:`TeacherCache` refuses a cache whose model, settings or
data differ from what the caller expects, naming the difference, and a shard whose checksum does
not match; :func:`verify_cache` checks every shard. Shards are written to a temporary name and
renamed into place, and the manifest last, so an interrupted build leaves no half-valid cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file
from typing_extensions import TypedDict  # pydantic reads typing.TypedDict only from Python 3.12

from kdforge.data.audio import read_metadata
from kdforge.errors import KdforgeError
from kdforge.files import check_new_folder, sha256_file, write_json_atomic
from kdforge.losses import TopKTeacher
from kdforge.losses.sparse import LOG_FLOOR

MANIFEST = "manifest.json"
#: The entry holding the ensemble's transcript of each utterance (built from the teachers' own).
ENSEMBLE = "ensemble"
#: The signals of a cached next-token (or frame) distribution: the :class:`TopKTeacher` fields.
TOP_K_FIELDS = ["topk_ids", "topk_logprobs", "tail_logprob"]
#: Settings listing the hidden states kept (encoder, decoder): a cache keeping more serves a run mapping fewer.
LAYER_SETTINGS = ("layers", "decoder_layers")
#: The setting naming the fixed maps that the ``mapped.<layer>`` states went through (None: none stored).
#: Optional: a run whose maps differ maps the raw ``hidden.<layer>`` states itself.
MAP_SETTING = "map"


def top_k_signals(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The cached fields of ``logits (n, V)``: top-k ids and log-probs, tail mass; V <= k is kept whole."""
    sparse = TopKTeacher.from_logits(logits, min(k, logits.shape[-1]))
    return dict(zip(TOP_K_FIELDS, (sparse.indices, sparse.logprobs, sparse.tail_logprob)))


def as_top_k(signals: list[dict[str, torch.Tensor]]) -> list[TopKTeacher]:
    """Each utterance's cached :data:`TOP_K_FIELDS` as a :class:`TopKTeacher` ``(n_i, k)``, in order."""
    return [TopKTeacher(*(s[f] for f in TOP_K_FIELDS)) for s in signals]


def stack_top_k(rows: list[TopKTeacher], offset: int, length: int) -> TopKTeacher:
    """Place each example's top-k rows ``(n_i, k)`` at positions ``offset..offset+n_i`` of a ``(B, length, k)`` grid.

    Positions outside hold a valid placeholder distribution (uniform over k ids, no tail) that the
    target mask leaves out of every loss.
    """
    k = rows[0].indices.shape[-1]
    indices = torch.arange(k).expand(len(rows), length, k).clone()
    logprobs = torch.full((len(rows), length, k), -math.log(k))
    tail = torch.full((len(rows), length), LOG_FLOOR)
    for row, teacher in enumerate(rows):
        n = teacher.indices.shape[0]
        indices[row, offset : offset + n] = teacher.indices
        logprobs[row, offset : offset + n] = teacher.logprobs.float()
        tail[row, offset : offset + n] = teacher.tail_logprob.float()
    return TopKTeacher(indices, logprobs, tail)


@contextmanager
def sealed_build(out: str | Path) -> Iterator[Path]:
    """Build a cache in a hidden folder beside ``out`` and rename it to ``out`` only when the block ends
    without error: an interrupted build leaves no half cache at ``out`` (a later run would refuse the
    folder), and the next build discards the leftover.

    Raises:
        KdforgeError: ``out`` is a file or a non-empty folder (never overwritten).
    """
    final = check_new_folder(out)
    building = final.with_name(f".{final.name}.building")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    yield building
    if final.exists():
        final.rmdir()  # empty, checked above
    building.rename(final)


def settings_hash(settings: dict) -> str:
    """A stable hash of a teacher's cache settings (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def data_fingerprint(data_dir: str | Path) -> str:
    """sha256 over an audiofolder's ``metadata.csv`` and the name and size of every file it lists.

    Raises:
        KdforgeError: ``data_dir`` is not an audiofolder.
    """
    data_dir = Path(data_dir)
    read_metadata(data_dir)  # only checked: a missing folder is named as every reader of audio names it
    digest = hashlib.sha256((data_dir / "metadata.csv").read_bytes())
    for path in sorted(data_dir.iterdir()):
        if path.is_file() and path.name != "metadata.csv":
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def model_identity(model_dir: str | Path) -> dict:
    """A model folder's weights checksum (the ``*.safetensors`` files, in name order)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(sha256_file(path).encode())
    return {"path": str(model_dir), "weights_sha256": digest.hexdigest()[:16]}


@dataclass
class TeacherShards:
    """Writes one teacher's signals into shards of ``shard_size`` utterances."""

    root: Path
    name: str
    shard_size: int = 256
    shards: list[dict] = field(default_factory=list)
    _pending: dict[str, torch.Tensor] = field(default_factory=dict)
    _pending_ids: list[str] = field(default_factory=list)

    def add(self, utterance_id: str, signals: dict[str, torch.Tensor]) -> None:
        """Queue an utterance's tensors (``signal name -> tensor``); full shards are written at once."""
        if "/" in utterance_id:
            raise KdforgeError(f"utterance id {utterance_id!r} may not contain '/'")
        for signal, tensor in signals.items():
            self._pending[f"{utterance_id}/{signal}"] = tensor.detach().contiguous().cpu()
        self._pending_ids.append(utterance_id)
        if len(self._pending_ids) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the queued utterances as the next shard (temporary name, then rename)."""
        if not self._pending_ids:
            return
        folder = self.root / self.name
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"shard-{len(self.shards):05d}.safetensors"
        temporary = final.with_name(f".{final.name}.tmp")
        save_file(self._pending, temporary)
        temporary.rename(final)
        self.shards.append({"file": f"{self.name}/{final.name}", "sha256": sha256_file(final),
                            "utterances": list(self._pending_ids)})
        self._pending, self._pending_ids = {}, []


def write_manifest(root: Path, data: str, teachers: dict[str, tuple[dict, dict, TeacherShards]]) -> None:
    """Seal the cache: ``teachers`` maps a name to ``(model identity, settings, its written shards)``."""
    entries = {}
    for name, (identity, settings, shards) in teachers.items():
        shards.flush()
        entries[name] = {"model": identity, "settings": settings, "settings_hash": settings_hash(settings),
                         "shards": shards.shards}
    write_json_atomic(root / MANIFEST, {"version": 1, "data": data, "teachers": entries})


class ShardEntry(TypedDict):
    """One shard: its file (relative to the cache folder), checksum and utterance ids."""

    file: str
    sha256: str
    utterances: list[str]


class TeacherEntry(TypedDict):
    """A teacher's (or the ensemble's) part of the manifest."""

    model: dict[str, Any]  # a teacher's model_identity, or the ensemble's {"members": [names]}
    settings: dict[str, Any]
    settings_hash: str
    shards: list[ShardEntry]


class Manifest(TypedDict):
    """What ``manifest.json`` holds; :func:`read_manifest` checks a file against it."""

    version: int
    data: str
    teachers: dict[str, TeacherEntry]


_MANIFEST_SCHEMA = TypeAdapter(Manifest)


def read_manifest(root: str | Path) -> Manifest:
    """The manifest of the cache in ``root``, checked to have every field readers use.

    Raises:
        KdforgeError: no manifest, or one that is not JSON or lacks a field (named).
    """
    path = Path(root) / MANIFEST
    try:
        return _MANIFEST_SCHEMA.validate_json(path.read_bytes())
    except FileNotFoundError:
        raise KdforgeError(f"{root} is not a teacher cache (no {MANIFEST})") from None
    except OSError as error:
        raise KdforgeError(f"cannot read {path}: {error.strerror}") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise KdforgeError(f"{path} is damaged ({where + ': ' if where else ''}{first['msg']}); "
                           "rebuild the cache") from None


def verify_cache(root: str | Path) -> int:
    """Check every shard against the manifest; returns the number of shards.

    Raises:
        KdforgeError: naming the first missing or corrupted shard.
    """
    root = Path(root)
    count = 0
    for teacher in read_manifest(root)["teachers"].values():
        for shard in teacher["shards"]:
            path = root / shard["file"]
            if not path.is_file():
                raise KdforgeError(f"shard {shard['file']} is missing")
            if sha256_file(path) != shard["sha256"]:
                raise KdforgeError(f"shard {shard['file']} is corrupted (checksum differs from the manifest)")
            count += 1
    return count


class TeacherCache:
    """Reads teacher signals by utterance id, after checking the cache is the one expected.

    Args:
        root: the cache folder.
        expected: teacher name -> ``(model folder, settings)`` the caller would run it with.
        data: the training data's :func:`data_fingerprint`.

    The ensemble's transcripts, when the cache has them, are read as teacher :data:`ENSEMBLE`.

    A cache holding more hidden-state layers (:data:`LAYER_SETTINGS`) than ``expected`` names serves the run.

    Raises:
        KdforgeError: a teacher is missing, or its model, settings or the data differ (named).
    """

    def __init__(self, root: str | Path, expected: dict[str, tuple[str | Path, dict]], data: str):
        self.root = Path(root)
        manifest = read_manifest(self.root)
        if manifest["data"] != data:
            raise KdforgeError(f"the teacher cache {root} was built on other data (fingerprint "
                               f"{manifest['data']}, the data now is {data}); rebuild it")
        self.locations: dict[str, dict[str, dict]] = {}
        self._maps: dict[str, dict | None] = {}
        for name, (model_dir, settings) in expected.items():
            entry = manifest["teachers"].get(name)
            if entry is None:
                raise KdforgeError(f"the teacher cache {root} has no teacher {name!r}")
            if entry["model"].get("weights_sha256") != model_identity(model_dir)["weights_sha256"]:
                raise KdforgeError(f"the teacher cache {root} holds another model for {name!r} "
                                   f"(cached {entry['model'].get('path', '?')}, now {model_dir}); rebuild it")
            cached = entry["settings"]
            changed = sorted(k for k in {*settings, *cached} - {*LAYER_SETTINGS, MAP_SETTING}
                             if settings.get(k) != cached.get(k))
            for key in LAYER_SETTINGS:  # a cache holding more layers than a run maps serves it
                absent = sorted(set(settings.get(key) or []) - set(cached.get(key) or []))
                if absent:
                    changed.append(f"{key} ({absent[0]} not cached)")
            if changed:
                raise KdforgeError(f"the teacher cache {root} was built for {name!r} with other settings "
                                   f"({', '.join(changed)} differ); rebuild it")
            self.locations[name] = self._index(entry)
            self._maps[name] = cached.get(MAP_SETTING)
        self._members = manifest["teachers"].get(ENSEMBLE, {}).get("model", {}).get("members", [])
        if ENSEMBLE in manifest["teachers"]:
            self.locations[ENSEMBLE] = self._index(manifest["teachers"][ENSEMBLE])
        self._open_shards: dict[str, tuple] = {}

    def members(self) -> list[str]:
        """The teachers, in order, whose transcripts the ensemble entry was chosen from."""
        return list(self._members)

    def maps(self, teacher: str) -> dict | None:
        """The fixed maps (:data:`MAP_SETTING`) the teacher's ``mapped.<layer>`` states went through, or None."""
        return self._maps.get(teacher)

    @staticmethod
    def _index(entry: dict) -> dict[str, dict]:
        return {utterance: shard for shard in entry["shards"] for utterance in shard["utterances"]}

    def signals(self, teacher: str, utterance_id: str, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The cached tensors of one teacher for one utterance, by signal name (``names``: only those)."""
        shard = self.locations[teacher].get(utterance_id)
        if shard is None:
            raise KdforgeError(f"the teacher cache has nothing from {teacher!r} for utterance {utterance_id!r}")
        handle, available = self._open(shard)
        prefix = f"{utterance_id}/"
        keys = [f"{prefix}{name}" for name in names] if names is not None else \
            [key for key in available if key.startswith(prefix)]
        missing = [key for key in keys if key not in available]
        if missing:
            raise KdforgeError(f"the teacher cache has no {missing[0]!r} from {teacher!r}: rebuild it")
        return {key[len(prefix):]: handle.get_tensor(key) for key in keys}

    def _open(self, shard: dict):
        """A shard's reader and its keys, opened (and its checksum verified) once per cache reader:
        a run reads every utterance many times, and each opening parses the shard's whole header."""
        if shard["file"] not in self._open_shards:
            path = self.root / shard["file"]
            if not path.is_file() or sha256_file(path) != shard["sha256"]:
                raise KdforgeError(f"shard {shard['file']} is missing or corrupted; run `kdforge cache verify`")
            handle = safe_open(path, framework="pt")  # memory-mapped: holding it open costs no reading
            self._open_shards[shard["file"]] = (handle, set(handle.keys()))
        return self._open_shards[shard["file"]]

    def batch(self, teacher: str, utterance_ids: list[str], names: list[str] | None = None) -> list[dict[str, torch.Tensor]]:
        """:meth:`signals` for each utterance of a training batch, in order."""
        return [self.signals(teacher, utterance, names) for utterance in utterance_ids]

    def text(self, teacher: str, utterance_id: str, name: str = "pseudo_label") -> str:
        """A cached transcript (``pseudo_label``, or the ensemble's ``target``) as text."""
        return bytes(self.signals(teacher, utterance_id, [name])[name].tolist()).decode("utf-8")
