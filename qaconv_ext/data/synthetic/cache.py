"""Writing the synthetic camera network as Market-1501 folders, and reusing a complete set.

``root/manifest.json`` records the generator version and every parameter; a set is reused when it
matches and the image counts agree. New data are written into a temporary folder under ``root`` and
moved into place, the manifest last, under an advisory lock.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional

from .plan import DOMAINS, FPS, GENERATOR_VERSION, SUBDIRS, plan_synthetic_network, resolve_params
from .render import render_tasks

def _tasks_for(plan: Dict[str, Any], out_dir: str, p: Dict[str, Any]) -> List[Dict[str, Any]]:
    tasks = []
    for im in plan["images"]:
        tasks.append(dict(path=os.path.join(out_dir, im["file"]), seed=im["seed"],
                          identity=im["identity"], other=im.get("other"), view=im["view"],
                          kind=im["kind"], occlusion=im["occlusion"],
                          style=plan["cameras"][im["cam"]], width=p["width"], height=p["height"]))
    return tasks


def _annotations(plan: Dict[str, Any], p: Dict[str, Any], seed: int) -> Dict[str, Any]:
    cols = ["file", "pid", "camid", "time", "group", "view", "occlusion", "split"]
    rows = [[im["file"], im["pid"], im["cam"], im["frame"] / FPS, im["group"], im["view"],
             im["occlusion"], im["split"]] for im in plan["images"]]
    cams = [{k: v for k, v in s.items() if k not in ("props",)} for s in plan["cameras"]]
    return {
        "generator_version": GENERATOR_VERSION, "seed": seed, "domain": plan["domain"],
        "fps": FPS, "params": _jsonable(p), "cameras": cams,
        "edges": [list(e) for e in plan["edges"]], "groups": plan["groups"],
        "images": {"columns": cols, "rows": rows},
    }


def _jsonable(p: Dict[str, Any]) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()}


def load_annotations(domain_path: str) -> Dict[str, Any]:
    """The ``annotations.json`` of a generated domain; ``images`` as a list of dicts."""
    with open(os.path.join(domain_path, "annotations.json"), "r", encoding="utf-8") as fh:
        ann = json.load(fh)
    cols = ann["images"]["columns"]
    ann["images"] = [dict(zip(cols, row)) for row in ann["images"]["rows"]]
    return ann


def _count_images(folder: str) -> int:
    try:
        with os.scandir(folder) as it:
            return sum(1 for e in it if e.name.endswith(".jpg"))
    except FileNotFoundError:
        return -1


def _manifest_ok(root: str, manifest: Dict[str, Any]) -> bool:
    path = os.path.join(root, "manifest.json")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            old = json.load(fh)
    except (OSError, ValueError):
        return False
    if old.get("version") != manifest["version"] or old.get("params") != manifest["params"]:
        return False
    for domain, counts in old.get("counts", {}).items():
        for split, n in counts.items():
            if _count_images(os.path.join(root, domain, SUBDIRS[split])) != n:
                return False
    return set(old.get("counts", {})) == set(DOMAINS)


@contextlib.contextmanager
def _locked(root: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no advisory locks on this platform
        yield
        return
    with open(os.path.join(root, ".synthetic.lock"), "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def make_synthetic_network(root: str, seed: int = 0, *, workers: Optional[int] = None,
                           progress: bool = True, force: bool = False,
                           **params: Any) -> Dict[str, str]:
    """Generate (or re-use) the synthetic camera network under ``root``.

    Returns ``{"domain_a": path, "domain_b": path}``; load either with ``Market1501(path)``.
    Keyword parameters (defaults in :data:`SYNTHETIC_DEFAULTS`, all per domain):
    ``num_train_ids=120``, ``num_test_ids=100``, ``num_distractors=100``, ``num_junk=20``,
    ``num_cameras=6``, ``sessions_per_camera=2``, ``group_size=(2, 4)``, ``path_length=(2, 4)``,
    ``images_per_visit=(2, 6)``, ``group_interval=80.0`` (seconds), ``occlusion_prob=0.25``,
    ``height=128``, ``width=64``.
    The same ``seed`` and parameters give byte-identical files whatever ``workers`` is.
    ``workers``: rendering processes (default: up to 4, by CPU count; 0 renders in this process).
    ``force``: regenerate even when a matching set exists.
    """
    p = resolve_params(params)
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    os.makedirs(root, exist_ok=True)
    out = {d: os.path.join(root, d) for d in DOMAINS}
    manifest: Dict[str, Any] = {"generator": "qaconv_ext synthetic camera network",
                                "version": GENERATOR_VERSION,
                                "params": dict(_jsonable(p), seed=int(seed))}
    with _locked(root):
        if not force and _manifest_ok(root, manifest):
            return out
        for name in os.listdir(root):  # leftovers of interrupted runs (we hold the lock)
            if name.startswith(".synthetic-tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        for d in DOMAINS:
            target = out[d]
            if os.path.exists(target) and not os.path.isfile(os.path.join(target, "annotations.json")):
                raise FileExistsError(f"{target} exists and was not written by the synthetic "
                                      "generator; refusing to overwrite it")
        t_start = time.time()
        plans = plan_synthetic_network(seed, **p)
        tmp = tempfile.mkdtemp(prefix=".synthetic-tmp-", dir=root)
        try:
            tasks: List[Dict[str, Any]] = []
            counts: Dict[str, Dict[str, int]] = {}
            for d in DOMAINS:
                base = os.path.join(tmp, d)
                for sub in SUBDIRS.values():
                    os.makedirs(os.path.join(base, sub))
                tasks += _tasks_for(plans[d], base, p)
                counts[d] = {s: sum(1 for im in plans[d]["images"] if im["split"] == s)
                             for s in SUBDIRS}
                _write_json_atomic(os.path.join(base, "annotations.json"),
                                   _annotations(plans[d], p, seed))
            render_tasks(tasks, workers, progress)
            # Swap in: invalidate the old manifest first, write the new one last.
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(root, "manifest.json"))
            for d in DOMAINS:
                if os.path.exists(out[d]):
                    trash = tempfile.mkdtemp(prefix=".synthetic-tmp-old-", dir=root)
                    os.rename(out[d], os.path.join(trash, d))
                    shutil.rmtree(trash, ignore_errors=True)
                os.rename(os.path.join(tmp, d), out[d])
            manifest["counts"] = counts
            manifest["seconds"] = round(time.time() - t_start, 2)
            _write_json_atomic(os.path.join(root, "manifest.json"), manifest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
