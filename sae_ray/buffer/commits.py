"""The buffer's bookkeeping, kept in the group's attributes: commits, drops, completion,
production info, the bounded window; and reader progress files beside them.

``CommitLog`` is a mixin of ``ActivationBuffer`` (store.py), which supplies the arrays and
objects (``array_names``, ``_get_object``, ``_object_size``, ``_fs``, ``capacity_rows``).
Only the coordinator calls the methods that change anything here; every read goes to the
store, since other processes change it. ``commit_state()`` answers "what is committed,
dropped, complete, windowed" from one read of the attributes.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from typing import Any, Iterable

import zarr

from .errors import ShardDroppedError
from .layout import check_reader_id, is_local, json_normalise, object_key, write_atomically
from .records import HASH, CommitState, object_entry, record_rows, shard_record

_HEX128 = re.compile(r"^[0-9a-f]{32}$")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class CommitLog:
    path: str
    shard_rows: int

    # ------------------------------------------------------------------ attributes

    def _attrs(self) -> dict[str, Any]:
        """The group's attributes, fresh from the store."""
        return dict(zarr.open_group(self.path, mode="r", use_consolidated=False).attrs)

    def _update_attrs(self, values: dict[str, Any]) -> None:
        """Coordinator only: replace these top-level attributes."""
        zarr.open_group(self.path, mode="r+", use_consolidated=False).update_attributes(values)

    def commit_state(self) -> CommitState:
        """Committed and dropped shards, complete, window: one snapshot from one read of the attributes."""
        return CommitState.from_attrs(self._attrs())

    def _record(self, shard_id: int, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        """The commit record of a live shard (unchecked); ShardDroppedError or KeyError otherwise."""
        attrs = self._attrs() if attrs is None else attrs
        record = attrs["committed"].get(str(shard_id))
        if record is None:
            if str(shard_id) in attrs.get("dropped", {}):
                raise ShardDroppedError(f"buffer at {self.path!r}: shard {shard_id} was dropped (bounded window); "
                                        "its rows are gone", shard_id)
            raise KeyError(f"buffer at {self.path!r}: shard {shard_id!r} is not committed "
                           f"(committed: {sorted(map(int, attrs['committed']))})")
        return record

    # ------------------------------------------------------------------ commits

    def commit_shard(self, shard_id: int, n_rows: int, objects: dict[str, dict[str, Any]] | None = None) -> None:
        """Coordinator only: record that shard ``shard_id`` holds ``n_rows`` written rows.

        ``objects``: what ``write_shard`` returned ({array: {"nbytes", "xxh3_128"}}), so the data
        never passes through the committing process; each object's size in the store is
        checked against it. None: every object is read back from the store and hashed here.
        Committing the same shard again with the same rows (and objects) is a no-op."""
        where = f"buffer at {self.path!r}, shard {shard_id!r}"
        if not isinstance(shard_id, int) or isinstance(shard_id, bool) or shard_id < 0:
            raise ValueError(f"{where}: shard_id must be an int >= 0")
        if not isinstance(n_rows, int) or isinstance(n_rows, bool) or not 1 <= n_rows <= self.shard_rows:
            raise ValueError(f"{where}: n_rows must be an int in [1, {self.shard_rows}], got {n_rows!r}")
        if (shard_id + 1) * self.shard_rows > self.capacity_rows():
            raise ValueError(f"{where}: shard lies beyond the capacity ({self.capacity_rows()} rows)")
        attrs = self._attrs()
        if str(shard_id) in attrs.get("dropped", {}):
            raise ValueError(f"{where}: shard was dropped; shard ids are never reused")
        old = attrs["committed"].get(str(shard_id))
        if old is not None and objects is None and isinstance(old, dict) and old.get("rows") == n_rows:
            return  # a retried commit
        objects = self._measure(shard_id) if objects is None else self._checked_objects(shard_id, objects)
        record = shard_record(shard_id, n_rows, objects)
        if old is not None:
            if old == record:
                return
            rows = old.get("rows") if isinstance(old, dict) else old
            raise ValueError(f"{where}: already committed with {rows} rows and other objects; cannot recommit "
                             f"with {n_rows} rows (shards are written once)")
        self._update_attrs({"committed": {**attrs["committed"], str(shard_id): record}})

    def _measure(self, shard_id: int) -> dict[str, dict[str, Any]]:
        """{array: {"nbytes", "xxh3_128"}} of the shard's objects, read back from the store."""
        out = {}
        for name in self.array_names():
            data = self._get_object(name, shard_id)
            if data is None:
                raise ValueError(f"buffer at {self.path!r}, shard {shard_id}: cannot commit, array {name!r} has no "
                                 f"object for it ({object_key(name, shard_id)}): write the shard first")
            out[name] = object_entry(data)
        return out

    def _checked_objects(self, shard_id: int, objects: Any) -> dict[str, dict[str, Any]]:
        where = f"buffer at {self.path!r}, shard {shard_id}"
        names = self.array_names()
        if not isinstance(objects, dict) or sorted(objects) != sorted(names):
            got = sorted(objects) if isinstance(objects, dict) else type(objects).__name__
            raise ValueError(f"{where}: objects must describe exactly the arrays {sorted(names)} (what write_shard "
                             f"returned), got {got}")
        for name, entry in objects.items():
            ok = (isinstance(entry, dict) and _is_int(entry.get("nbytes")) and isinstance(entry.get(HASH), str)
                  and _HEX128.match(entry[HASH]))
            if not ok:
                raise ValueError(f"{where}: objects[{name!r}] must be {{'nbytes': int, '{HASH}': 32 hex digits}} "
                                 f"(what write_shard returned), got {entry!r}")
            size = self._object_size(object_key(name, shard_id))
            if size != entry["nbytes"]:
                found = "no object" if size is None else f"{size} bytes"
                raise ValueError(f"{where}: cannot commit, array {name!r} was written with {entry['nbytes']} bytes "
                                 f"but the store holds {found} at {object_key(name, shard_id)}")
        return objects

    def committed(self) -> dict[int, int]:
        """{shard_id: n_rows} of committed shards that are live (not dropped), sorted by id, read from the store."""
        return self.commit_state().committed

    def dropped(self) -> dict[int, int]:
        """{shard_id: n_rows} of shards committed and later dropped (bounded window), sorted by id."""
        return self.commit_state().dropped

    def n_rows(self) -> int:
        """Rows in live committed shards."""
        return sum(self.committed().values())

    def mark_complete(self) -> None:
        """Coordinator only: no more shards will be committed."""
        self._update_attrs({"complete": True})

    def is_complete(self) -> bool:
        """Whether the coordinator marked the buffer complete, read from the store."""
        return self.commit_state().complete

    def set_production(self, info: dict[str, Any]) -> None:
        """Coordinator only: how the buffer is being produced (e.g. {"producers": 2}), kept so a resumed run can check it."""
        self._update_attrs({"production": json_normalise(info, f"production info for buffer at {self.path!r}")})

    def production(self) -> dict[str, Any]:
        """What `set_production` recorded ({} if nothing yet), read from the store."""
        return dict(self._attrs().get("production", {}))

    # ------------------------------------------------------------------ bounded window

    def set_window(self, max_bytes: int | None) -> None:
        """Coordinator only: record that at most ``max_bytes`` of live shards are kept (None: no window).
        Readers of a windowed buffer read every shard once (one epoch) and then stop."""
        if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0):
            raise ValueError(f"buffer at {self.path!r}: window max_bytes must be a positive int or None, got {max_bytes!r}")
        self._update_attrs({"window_bytes": max_bytes})

    def window_bytes(self) -> int | None:
        """What ``set_window`` recorded (None: no window), read from the store."""
        return self.commit_state().window_bytes

    def is_windowed(self) -> bool:
        """A window is set or a shard has been dropped: readers see each shard once."""
        return self.commit_state().windowed

    def drop_shard(self, shard_id: int) -> None:
        """Coordinator only: forget a committed shard and delete its objects in every array.

        It leaves ``committed()`` (and ``n_rows()``), shows in ``dropped()``, and is never
        returned by a reader again; its id is never reused. The attributes change first,
        so a crash in between only leaves orphan objects, which dropping again deletes.
        """
        where = f"buffer at {self.path!r}, shard {shard_id!r}"
        if not isinstance(shard_id, int) or isinstance(shard_id, bool) or shard_id < 0:
            raise ValueError(f"{where}: shard_id must be an int >= 0")
        attrs = self._attrs()
        committed, dropped = dict(attrs["committed"]), dict(attrs.get("dropped", {}))
        if str(shard_id) in committed:
            dropped[str(shard_id)] = record_rows(committed.pop(str(shard_id)))
            self._update_attrs({"committed": committed, "dropped": dropped})
        elif str(shard_id) not in dropped:
            raise KeyError(f"{where}: only committed shards can be dropped (committed: {sorted(map(int, committed))})")
        fs, root = self._fs()
        for name in self.array_names():
            path = f"{root}/{object_key(name, shard_id)}"
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass
            if name.startswith("acts/") and is_local(self.path):  # the now empty c/<shard_id>/ directory
                try:
                    os.rmdir(os.path.dirname(path))
                except OSError:
                    pass

    # ------------------------------------------------------------------ reader progress

    def _progress_dir(self) -> str:
        fs, root = self._fs()
        return f"{root}/readers"

    def write_reader_progress(self, reader_id: str, passed: Iterable[int], epoch: int = 0, done: bool = False,
                              waiting: bool = False, seen: Iterable[int] | None = None) -> None:
        """Reader: record the shards it has passed (fully consumed) in ``epoch``, in
        ``<buffer>/readers/<reader_id>.json`` (atomically replaced on local paths; one PUT
        on object stores). Never touches the group's attributes.

        done: the reader reads no more (a bounded window stops waiting for it). waiting: it has
        consumed everything it read and waits for a new shard; seen: every shard it has taken so
        far (with ``waiting``: a shard committed since is one it has not seen)."""
        check_reader_id(reader_id, self.path)
        record = {"reader_id": reader_id, "epoch": int(epoch), "passed": sorted(int(s) for s in passed),
                  "done": bool(done), "waiting": bool(waiting), "updated": time.time()}
        if seen is not None:
            record["seen"] = sorted(int(s) for s in seen)
        fs, _ = self._fs()
        target = f"{self._progress_dir()}/{reader_id}.json"
        if is_local(self.path):
            write_atomically(target, json.dumps(record).encode())
        else:
            fs.pipe_file(target, json.dumps(record).encode())

    def _progress_files(self) -> tuple[Any, list[str]]:
        """(filesystem, the reader progress files, sorted), listed afresh (no cached listing)."""
        fs, _ = self._fs()
        folder = self._progress_dir()
        fs.invalidate_cache(folder)
        try:
            return fs, sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".json"))
        except FileNotFoundError:
            return fs, []

    def reader_progress(self) -> dict[str, set[int]]:
        """{reader_id: shards it has passed in its current epoch}, from ``<buffer>/readers/*.json``."""
        return {rid: state["passed"] for rid, state in self.reader_states().items()}

    def reader_states(self) -> dict[str, dict[str, Any]]:
        """{reader_id: {"passed": set, "done": bool, "waiting": bool, "seen": set | None}}: what each
        reader last recorded (``write_reader_progress``); an unreadable file is skipped with a warning."""
        fs, names = self._progress_files()
        out = {}
        for p in names:
            try:
                record = json.loads(fs.cat_file(p))
                seen = record.get("seen")
                out[str(record["reader_id"])] = {
                    "passed": {int(s) for s in record["passed"]}, "done": bool(record.get("done", False)),
                    "waiting": bool(record.get("waiting", False)), "seen": None if seen is None else {int(s) for s in seen}}
            except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
                warnings.warn(f"buffer at {self.path!r}: ignoring unreadable reader progress file {p} ({type(e).__name__}: {e})",
                              RuntimeWarning, stacklevel=2)
        return out

    def clear_reader_progress(self, keep: Iterable[str] = ()) -> None:
        """Coordinator only: forget the progress of every reader not in ``keep`` (a new production
        run: a reader of an earlier one that will not read again would otherwise hold shards forever)."""
        keep = {f"{r}.json" for r in keep}
        fs, names = self._progress_files()
        for p in names:
            if p.rsplit("/", 1)[-1] in keep:
                continue
            try:
                fs.rm(p)
            except FileNotFoundError:
                pass
