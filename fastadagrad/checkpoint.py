"""Optimizer state in torch.optim.Adagrad's layout, and crash-safe ``.npz`` checkpoints.

State dict (the layout of ``torch.optim.Adagrad.state_dict()``, NumPy instead of
tensors)::

    {"state": {i: {"step": 0-d float64 array, "sum": ndarray}, ...},
     "param_groups": [{"lr", "lr_decay", "eps", "weight_decay",
                       "initial_accumulator_value", "maximize", "foreach": None,
                       "differentiable": False, "fused", "params": [0, ..., n-1],
                       "param_names": [...] (only for dicts with str keys),
                       "fastadagrad": {"rule": {...}, "nonfinite", "skipped_steps"}}]}

``i`` is the position of the parameter in ``params`` (dict order for dicts). A torch
state dict converted with ``.numpy()`` loads as is (its ``"step"`` is torch's float32
step tensor); for the reverse, turn the arrays into tensors (``torch.from_numpy``) and
call torch's ``load_state_dict``: the extra ``"fastadagrad"`` entry is ignored by torch.

Checkpoint file: one ``.npz`` (a zip of ``.npy`` members, read back with
``allow_pickle=False``): ``sum_<i>`` per parameter and ``meta``, a JSON string with the
format version, the param group and every array's shape and dtype. :func:`save`
writes a temporary file in the same directory, flushes and fsyncs it, renames it over
``path`` with ``os.replace`` (atomic on POSIX) and fsyncs the directory, so a crash at
any point leaves either the old checkpoint or the new one, never a torn file. A
truncated or corrupted file fails to load with :class:`CheckpointError` (the zip CRC-32
of every member is checked on read).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ._hyper import Hyper, Rule, check_hyper, check_nonfinite

if TYPE_CHECKING:
    from .optim import AdaGrad

FORMAT = "fastadagrad-adagrad-checkpoint"
VERSION = 1
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


class CheckpointError(ValueError):
    """A state dict or checkpoint file that cannot be loaded (says which part and why)."""


# ------------------------------------------------------------------------ state dict

def _keys(h: Any) -> list[Any]:
    return list(h.keys()) if isinstance(h, Mapping) else list(range(len(h)))


def _to_host(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "copy_to_host"):  # numba device array
        return a.copy_to_host()
    return np.asarray(a)


def state_dict(opt: AdaGrad, *, copy: bool = True) -> dict[str, Any]:
    """``opt``'s state in torch.optim.Adagrad's layout (see the module docstring)."""
    from .presets import PRESETS

    hy = opt.hyper
    group: dict[str, Any] = {
        "lr": hy.lr, "lr_decay": hy.lr_decay, "eps": hy.eps,
        "weight_decay": hy.weight_decay,
        "initial_accumulator_value": opt.initial_accumulator_value,
        "foreach": None, "maximize": hy.maximize, "differentiable": False,
        # torch honours "fused" on load: say True only where the formula is its fused one
        "fused": True if hy.rule == PRESETS["torch"].rule else None,
        "params": [],
        "fastadagrad": {"rule": dataclasses.asdict(hy.rule), "nonfinite": opt.nonfinite,
                        "skipped_steps": int(opt.skipped_steps)},
    }
    state: dict[int, dict[str, Any]] = {}
    if opt.h is not None:
        keys = _keys(opt.h)
        group["params"] = list(range(len(keys)))
        if isinstance(opt.h, Mapping) and all(isinstance(k, str) for k in keys):
            group["param_names"] = list(keys)
        for i, k in enumerate(keys):
            s = _to_host(opt.h[k])
            state[i] = {"step": np.array(float(opt.step)),  # float64: exact to 2^53
                        "sum": np.array(s, copy=True) if copy else s}
    return {"state": state, "param_groups": [group]}


def _err(msg: str, where: str = "state_dict") -> CheckpointError:
    return CheckpointError(f"{where}: {msg}")


def _parse(sd: Any, where: str) -> tuple[dict[str, Any], list[np.ndarray], int | None]:
    """Validate a state dict; return its param group, the sums in order and the step."""
    if not isinstance(sd, Mapping) or set(sd) != {"state", "param_groups"}:
        got = sorted(map(str, sd)) if isinstance(sd, Mapping) else type(sd).__name__
        raise _err(f"expected a dict with keys ['param_groups', 'state'], got {got}", where)
    groups, state = sd["param_groups"], sd["state"]
    if not isinstance(groups, (list, tuple)) or len(groups) != 1 \
            or not isinstance(groups[0], Mapping):
        n = len(groups) if isinstance(groups, (list, tuple)) else type(groups).__name__
        raise _err(f"'param_groups' must be a list of one group (fastadagrad keeps one), "
                   f"got {n}", where)
    group = groups[0]
    for key in ("lr", "eps", "lr_decay", "weight_decay", "initial_accumulator_value",
                "maximize", "params"):
        if key not in group:
            raise _err(f"param group has no {key!r}", where)
    params = list(group["params"])
    if params != list(range(len(params))):
        raise _err(f"param group 'params' must be [0, ..., n-1], got {params}", where)
    if not isinstance(state, Mapping):
        raise _err(f"'state' must be a dict, got {type(state).__name__}", where)
    extra = [k for k in state if k not in params]
    if extra:
        raise _err(f"'state' has entries {extra} for no parameter of the group", where)
    if not state:
        return group, [], None
    sums, steps = [], set()
    for i in params:
        if i not in state:
            raise _err(f"no state for parameter {i}", where)
        entry = state[i]
        if not isinstance(entry, Mapping) or set(entry) != {"sum", "step"}:
            got = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
            raise _err(f"state[{i}] must have keys ['step', 'sum'], got {got}", where)
        s = entry["sum"]
        if not isinstance(s, np.ndarray):
            raise _err(f"state[{i}]['sum'] must be a NumPy array (convert tensors with "
                       f".numpy()), got {type(s).__name__}", where)
        if s.dtype not in _FLOATS:
            raise _err(f"state[{i}]['sum'] has dtype {s.dtype}; expected float32 or "
                       "float64", where)
        st = np.asarray(entry["step"])
        if st.shape != () or st.dtype.kind not in "iuf" or not np.isfinite(st) \
                or st < 0 or float(st) != int(st):
            raise _err(f"state[{i}]['step'] must be a whole number >= 0, got "
                       f"{entry['step']!r}", where)
        sums.append(s)
        steps.add(int(st))
    if len(steps) != 1:
        raise _err(f"parameters are at different steps {sorted(steps)}; fastadagrad keeps "
                   "one step counter", where)
    return group, sums, steps.pop()


def load_state_dict(opt: AdaGrad, sd: Any, params: Any = None, *,
                    where: str = "state_dict") -> None:
    """Load ``sd`` into ``opt``: hyperparameters, step and accumulators.

    Everything is validated before anything is changed. If ``opt`` already has state
    (it has stepped), the sums are copied into its arrays in place and must match their
    number, shapes and dtypes. Otherwise the state is created from ``sd``: keyed like
    ``params`` if given (a dict or list of the parameter arrays, in the order the state
    dict numbers them), else by ``param_names`` if present, else as a list.

    The formula (``opt.hyper.rule``) is replaced only by the one a fastadagrad state
    dict records; a torch state dict has none, so load it into
    ``AdaGrad.from_preset("torch")`` to continue bit-identically.
    """
    from .flat import FlatBuffer
    from .optim import _layout_of

    group, sums, step = _parse(sd, where)
    fa = group.get("fastadagrad", {})
    try:
        rule = Rule(**fa["rule"]) if "rule" in fa else opt.hyper.rule
        hyper = Hyper.make(lr=group["lr"], eps=group["eps"], lr_decay=group["lr_decay"],
                           weight_decay=group["weight_decay"],
                           maximize=bool(group["maximize"]), rule=rule)
        iav = check_hyper("initial_accumulator_value", group["initial_accumulator_value"])
        nonfinite = check_nonfinite(fa.get("nonfinite", opt.nonfinite))
    except (TypeError, ValueError) as e:
        raise _err(f"bad hyperparameter in the param group: {e}", where) from e
    skipped = int(fa.get("skipped_steps", 0))

    new_h, new_flat = None, None
    if sums and opt.h is not None:
        keys = _keys(opt.h)
        if len(keys) != len(sums):
            raise _err(f"has state for {len(sums)} parameters, the optimizer for "
                       f"{len(keys)}", where)
        for i, (k, s) in enumerate(zip(keys, sums)):
            cur = opt.h[k]
            if tuple(cur.shape) != s.shape or np.dtype(cur.dtype) != s.dtype:
                raise _err(f"state[{i}]['sum'] is {s.dtype}{list(s.shape)} but parameter "
                           f"{k!r} is {np.dtype(cur.dtype)}{list(cur.shape)}", where)
    elif sums:
        if params is not None:
            pkeys = list(params.keys()) if isinstance(params, Mapping) \
                else list(range(len(params)))
            plist = [params[k] for k in pkeys]
            if len(plist) != len(sums):
                raise _err(f"has state for {len(sums)} parameters, params has "
                           f"{len(plist)}", where)
            for i, (k, p, s) in enumerate(zip(pkeys, plist, sums)):
                if tuple(np.shape(p)) != s.shape or np.dtype(p.dtype) != s.dtype:
                    raise _err(f"state[{i}]['sum'] is {s.dtype}{list(s.shape)} but "
                               f"params[{k!r}] is {np.dtype(p.dtype)}{list(np.shape(p))}",
                               where)
            as_dict = isinstance(params, Mapping)
        elif "param_names" in group:
            pkeys = list(group["param_names"])
            if len(pkeys) != len(sums) or len(set(pkeys)) != len(pkeys):
                raise _err(f"'param_names' {pkeys} does not name the {len(sums)} "
                           "parameters one to one", where)
            as_dict = True
        else:
            pkeys, as_dict = list(range(len(sums))), False
        # one flat buffer per dtype, views per key: the layout update() creates
        new_flat, views = [], [None] * len(sums)
        for dt in _FLOATS:
            idx = [i for i, s in enumerate(sums) if s.dtype == dt]
            if not idx:
                continue
            buf = FlatBuffer._from(
                np.concatenate([sums[i].reshape(-1) for i in idx]) if idx else
                np.empty(0, dt), tuple(_layout_of([(i, sums[i]) for i in idx])))
            new_flat.append(buf)
            for i in idx:
                views[i] = buf[i]
        new_h = dict(zip(pkeys, views)) if as_dict else views

    # ---- validated: commit
    if sums and opt.h is not None:
        for k, s in zip(_keys(opt.h), sums):
            cur = opt.h[k]
            if isinstance(cur, np.ndarray):
                np.copyto(cur, s)
            else:  # device array
                cur.copy_to_device(np.ascontiguousarray(s))
    elif sums:
        opt.h, opt._flat = new_h, new_flat
    opt.hyper = hyper
    opt.initial_accumulator_value = iav
    opt.nonfinite = nonfinite
    opt.step = step if step is not None else 0
    opt.skipped_steps = skipped


# ------------------------------------------------------------------------ files

def save(opt: AdaGrad, path: str | os.PathLike[str]) -> None:
    """Write ``opt``'s state to ``path`` (one ``.npz``), atomically (see module doc)."""
    path = os.fspath(path)
    sd = state_dict(opt, copy=False)
    group = sd["param_groups"][0]
    arrays = {f"sum_{i}": np.ascontiguousarray(e["sum"]) for i, e in sd["state"].items()}
    meta = {"format": FORMAT, "version": VERSION,
            "step": int(opt.step) if sd["state"] else None,
            "param_group": group,
            "arrays": {k: {"shape": list(a.shape), "dtype": a.dtype.str}
                       for k, a in arrays.items()}}
    arrays["meta"] = np.array(json.dumps(meta))
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    """Make the rename durable: fsync the directory entry (POSIX; a no-op elsewhere)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def load(opt: AdaGrad, path: str | os.PathLike[str], params: Any = None) -> None:
    """Load a checkpoint written by :func:`save` into ``opt`` (see :func:`load_state_dict`).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated, corrupted, not a fastadagrad checkpoint,
            or does not fit ``opt``; ``opt`` is then unchanged.
    """
    path = os.fspath(path)
    where = f"checkpoint {path!r}"
    try:
        # our own file object: np.load leaks its file when a broken zip makes it fail
        with open(path, "rb") as fh:
            z = np.load(fh, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise _err("not a fastadagrad checkpoint (a single .npy array, not a "
                           ".npz)", where)
            with z:
                if "meta" not in z.files:
                    raise _err("not a fastadagrad checkpoint (no 'meta' entry)", where)
                meta = json.loads(str(z["meta"][()]))
                if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                    raise _err("not a fastadagrad checkpoint (unknown format)", where)
                if meta.get("version") != VERSION:
                    raise _err(f"format version {meta.get('version')!r}; this "
                               f"fastadagrad reads version {VERSION}", where)
                specs = meta["arrays"]
                if sorted(specs) != sorted(f for f in z.files if f != "meta"):
                    raise _err(f"entries {sorted(z.files)} do not match its index "
                               f"{sorted(specs)}", where)
                arrays = {k: z[k] for k in specs}  # each member read whole: CRC checked
    except FileNotFoundError:
        raise
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, TypeError,
            json.JSONDecodeError) as e:
        raise _err(f"cannot be read, truncated or corrupted ({type(e).__name__}: {e})",
                   where) from e
    for k, spec in specs.items():
        a = arrays[k]
        if list(a.shape) != spec["shape"] or a.dtype.str != spec["dtype"]:
            raise _err(f"entry {k!r} is {a.dtype.str}{list(a.shape)}, its index says "
                       f"{spec['dtype']}{spec['shape']}", where)
    n = len(specs)
    if sorted(specs) != sorted(f"sum_{i}" for i in range(n)):
        raise _err(f"entries {sorted(specs)} are not sum_0..sum_{n - 1}", where)
    step = meta["step"]
    sd = {"state": {i: {"sum": arrays[f"sum_{i}"], "step": np.float64(step or 0)}
                    for i in range(n)},
          "param_groups": [meta["param_group"]]}
    load_state_dict(opt, sd, params, where=where)
