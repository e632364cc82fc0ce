"""Optimizer state in torch.optim.Adagrad's layout, and crash-safe ``.npz`` checkpoints.

State dict (the layout of ``torch.optim.Adagrad.state_dict()``, NumPy instead of
tensors)::

    {"state": {i: {"step": 0-d float64 array, "sum": ndarray}, ...},
     "param_groups": [{"lr", "lr_decay", "eps", "weight_decay",
                       "initial_accumulator_value", "maximize", "foreach": None,
                       "differentiable": False, "fused", "params": [0, ..., n-1],
                       "param_names": [...] (only for dicts with str keys),
                       "fastadagrad": {"rule": {...}, "nonfinite", "skipped_steps",
                                       "rounding", "seed", "master_weights", ...}}]}

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
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._arrays import is_cuda_array
from ._hyper import Hyper, Rule, check_hyper, check_in_dtype
from ._rounding import check_options, is_half
from .flat import FlatBuffer, layout_of

AdaGrad = Any  # the optimizer (optim.py imports this module, not the other way round)

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
    if is_cuda_array(a):  # Numba, torch or CuPy device array
        from . import cuda

        return cuda.to_host(a)
    return np.asarray(a)


def state_dict(opt: AdaGrad, *, copy: bool = True) -> dict[str, Any]:
    """``opt``'s state in torch.optim.Adagrad's layout (see the module docstring)."""
    from .presets import PRESETS

    opt._check_attributes("nothing was saved")  # (a step set by hand: as update, load)
    hy = opt.hyper
    group: dict[str, Any] = {
        "lr": float(opt.lr), "lr_decay": hy.lr_decay, "eps": hy.eps,
        "weight_decay": hy.weight_decay,
        "initial_accumulator_value": opt.initial_accumulator_value,
        "foreach": None, "maximize": hy.maximize, "differentiable": False,
        # torch honours "fused" on load: say True only where the formula is its fused one
        "fused": True if hy.rule == PRESETS["torch"].rule else None,
        "params": [],
        "fastadagrad": {"rule": dataclasses.asdict(hy.rule), "nonfinite": opt.nonfinite,
                        "skipped_steps": int(opt.skipped_steps)},
    }
    # 16-bit params (optim.py): written every time, so that a resumed run rounds as
    # the saved one did whatever the loading optimizer was built with
    group["fastadagrad"].update(rounding=getattr(opt, "rounding", "nearest"),
                                seed=getattr(opt, "seed", 0),  # (None: nearest only)
                                master_weights=bool(getattr(opt, "master_weights", False)))
    master = getattr(opt, "master", None) or {}
    state: dict[int, dict[str, Any]] = {}
    if opt.h is not None:
        keys = _keys(opt.h)
        group["params"] = list(range(len(keys)))
        # (state loaded without its names keeps placeholders 0..n-1 until an update
        # names it: saved again, it stays unnamed)
        named = isinstance(opt.h, Mapping) and not getattr(opt, "_positional", False)
        if named and all(isinstance(k, str) for k in keys):
            group["param_names"] = list(keys)
        if named and all(_json_key(k) for k in keys):
            group["fastadagrad"]["keys"] = list(keys)  # str and int keys, for the file
        group["fastadagrad"]["container"] = "dict" if isinstance(opt.h, Mapping) else "list"
        for i, k in enumerate(keys):
            s = _to_host(opt.h[k])
            state[i] = {"step": np.array(float(opt.step)),  # float64: exact to 2^53
                        "sum": np.array(s, copy=True) if copy else s}
            if k in master:  # the float32 master copy of a 16-bit param
                m = _to_host(master[k])  # (a device copy where the state is on one)
                state[i]["master"] = np.array(m, copy=True) if copy else m
    return {"state": state, "param_groups": [group]}


def _like(host: np.ndarray, proto: Any) -> Any:
    """``host``, or a copy of it on ``proto``'s device in ``proto``'s library when
    ``proto`` is a CUDA array."""
    if is_cuda_array(proto):
        from . import cuda

        return cuda.to_device_like(host, proto)
    return host


def _flag(x: Any) -> Any:
    """A 0-d bool array as a bool; anything else as it is, for :meth:`Hyper.make` to
    check (``bool("False")`` is True: a string or a number is refused, as by the
    constructor)."""
    if isinstance(x, np.ndarray) and x.shape == () and x.dtype == np.bool_:
        return bool(x)
    return x


def _real(x: Any) -> Any:
    """A one-element real array (a torch state dict's tensor ``lr`` converted with
    ``.numpy()``) as a float; anything else as it is, for :meth:`Hyper.make` to check."""
    if isinstance(x, np.ndarray) and x.size == 1 and x.dtype.kind in "fiu":
        return float(x.reshape(()))
    return x


def _json_key(k: Any) -> bool:
    return isinstance(k, str) or (isinstance(k, int) and not isinstance(k, bool))


def _err(msg: str, where: str = "state_dict") -> CheckpointError:
    return CheckpointError(f"{where}: {msg}")


def _parse(sd: Any, where: str) -> tuple[dict[str, Any], list[np.ndarray], int | None]:
    """Validate a state dict; return its param group, the sums in order and the step."""
    try:
        return _parse_checked(sd, where)
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
        raise _err(f"malformed ({type(e).__name__}: {e})", where) from e


def _parse_checked(sd: Any, where: str
                   ) -> tuple[dict[str, Any], list[np.ndarray], int | None]:
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
        if not isinstance(entry, Mapping) or set(entry) - {"master"} != {"sum", "step"}:
            got = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
            raise _err(f"state[{i}] must have keys ['step', 'sum'] (and 'master' for a "
                       f"16-bit param), got {got}", where)
        s = entry["sum"]
        m = entry.get("master")
        if m is not None and not (isinstance(m, np.ndarray) and m.dtype == np.float32
                                  and m.shape == np.shape(s)):
            raise _err(f"state[{i}]['master'] must be a float32 array shaped like its "
                       f"sum {list(np.shape(s))}, got {_what(m)}", where)
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


def _what(a: Any) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype}{list(a.shape)}"
    return type(a).__name__


def _masters(sd: Mapping[str, Any]) -> dict[int, np.ndarray]:
    """The float32 master copies in a state dict parsed by :func:`_parse`, by position."""
    return {i: e["master"] for i, e in sd["state"].items() if "master" in e}


def _dtype_of(x: Any) -> np.dtype | None:
    """``x``'s dtype as a NumPy dtype (NumPy, Numba and CuPy arrays, torch tensors), or
    None if NumPy has no such dtype."""
    dt = getattr(x, "dtype", None)
    if dt is None:  # np.dtype(None) would be float64
        return None
    try:
        return np.dtype(dt)
    except TypeError:  # torch.float32 and friends
        name = str(dt).rsplit(".", 1)[-1]
        try:
            return np.dtype(name)
        except TypeError:
            pass
    if name == "bfloat16":
        try:
            import ml_dtypes  # the half extra; a torch bfloat16 tensor has no NumPy twin
        except ImportError:
            return None
        return np.dtype(ml_dtypes.bfloat16)
    return None


def _names(group: Mapping[str, Any], n: int, where: str) -> list[Any] | None:
    """The saved parameters' names (keys), in state-dict order, or None if unnamed."""
    fa = group.get("fastadagrad", {})
    names = fa.get("keys", group.get("param_names"))
    if names is None:
        return None
    if not isinstance(names, (list, tuple)) or not all(_json_key(k) for k in names):
        raise _err(f"'param_names' must be a list of str or int, got {names!r}", where)
    names = list(names)
    if len(names) != n or len(set(names)) != n:
        raise _err(f"'param_names' {names} does not name the {n} parameters one to one",
                   where)
    return names


def _order(saved: list[Any] | None, keys: list[Any], named: bool, what: str,
           where: str) -> list[int]:
    """Which saved entry goes to each of ``keys``: by name when both sides have names,
    else by position (torch's rule). Refuses names that do not match."""
    if saved is not None and named:
        if set(saved) != set(keys):
            missing = [k for k in keys if k not in saved]
            extra = [k for k in saved if k not in keys]
            raise _err(f"saved parameter names do not match {what}: {what} has "
                       f"{missing} that the state lacks, the state has {extra} that "
                       f"{what} lacks", where)
        at = {k: i for i, k in enumerate(saved)}
        return [at[k] for k in keys]
    return list(range(len(keys)))


def load_state_dict(opt: AdaGrad, sd: Any, params: Any = None, *,
                    where: str = "state_dict") -> None:
    """Load ``sd`` into ``opt``: accumulators, step counters and hyperparameters.

    Everything is validated before anything is changed. What a state dict carries:

    * the accumulators, ``step`` and ``skipped_steps``: the whole training state is
      replaced (a state dict with no accumulators resets ``opt`` to a fresh optimizer);
    * the formula's hyperparameters ``lr``, ``eps``, ``lr_decay``, ``weight_decay``,
      ``maximize``, ``initial_accumulator_value`` and the rule, as
      ``torch.optim.Optimizer.load_state_dict`` does (a torch state dict has no rule:
      one from ``torch.optim.Adagrad(fused=True)`` continues bit-identically in
      ``AdaGrad.from_preset("torch")``; torch's default and ``foreach=True`` steps take
      MKL's square root, which only :class:`fastadagrad.torch.Adagrad` reproduces). If
      ``opt`` has a learning-rate schedule, the schedule stays and the saved ``lr`` is
      not used;
    * for 16-bit params, ``rounding``, ``seed`` and ``master_weights`` with the float32
      master copies (made on the device of the state when it is on a GPU); a state
      dict from another library has none of them and ``opt`` keeps its own;
    * not ``nonfinite``: how to treat NaN/inf gradients stays what ``opt`` was built
      with (the file records it for information only).

    Accumulators are matched to parameters **by name** when the state dict names them
    (``param_names``, or the keys fastadagrad records for str and int dict keys) and
    the optimizer or ``params`` is keyed: different names raise. Unnamed state (a list,
    a torch state dict) is matched by position. If ``opt`` already has state, the sums
    are copied into its arrays in place (same keys, shapes and dtypes). Otherwise it is
    created from ``sd``: keyed like ``params`` if given, else by the saved names, else
    as a list (a dict whose keys were not saved: keyed 0..n-1 until the first update's
    dict names it, by position); on the device of ``params`` when those are CUDA arrays (or a device
    :class:`~fastadagrad.FlatBuffer`, whose layout the state then shares).
    """
    group, sums, step = _parse(sd, where)
    fa = group.get("fastadagrad", {})
    if not isinstance(fa, Mapping):
        raise _err(f"'fastadagrad' entry must be a dict, got {type(fa).__name__}", where)
    try:
        rule = Rule(**fa["rule"]) if "rule" in fa else opt.hyper.rule
        hyper = Hyper.make(lr=opt.hyper.lr if opt.schedule is not None else _real(group["lr"]),
                           eps=group["eps"], lr_decay=group["lr_decay"],
                           weight_decay=group["weight_decay"],
                           maximize=_flag(group["maximize"]), rule=rule)
        iav = check_hyper("initial_accumulator_value", group["initial_accumulator_value"])
        for s in sums:
            check_in_dtype("initial_accumulator_value", iav, s.dtype)
    except (TypeError, ValueError) as e:
        raise _err(f"bad hyperparameter in the param group: {e}", where) from e
    skipped = fa.get("skipped_steps", 0)
    if isinstance(skipped, bool) or not isinstance(skipped, (int, np.integer)) \
            or skipped < 0:
        raise _err(f"'skipped_steps' must be a whole number >= 0, got {skipped!r}", where)
    saved = _names(group, len(sums), where) if sums else None
    masters = _masters(sd)
    # fastadagrad's own state dicts carry the 16-bit options (files written before
    # they were always recorded left out the defaults: nearest, no master weights);
    # another library's (torch's) leave the loading optimizer's own
    ours = "fastadagrad" in group
    try:
        rounding, seed = check_options(
            fa.get("rounding", "nearest" if ours else getattr(opt, "rounding", "nearest")),
            fa.get("seed", getattr(opt, "seed", 0)))
    except (TypeError, ValueError) as e:
        raise _err(f"bad rounding option in the param group: {e}", where) from e
    master_weights = _flag(fa.get("master_weights", False if ours else
                                  getattr(opt, "master_weights", False)))
    if not isinstance(master_weights, (bool, np.bool_)):
        raise _err("'master_weights' must be a bool, got "
                   f"{type(master_weights).__name__}", where)

    new_h: Any = None
    new_flat: list[Any] = []
    if sums and opt.h is not None:
        keys = _keys(opt.h)
        if len(keys) != len(sums):
            raise _err(f"has state for {len(sums)} parameters, the optimizer for "
                       f"{len(keys)}", where)
        order = _order(saved, keys, isinstance(opt.h, Mapping), "the optimizer", where)
        for k, j in zip(keys, order):
            cur, s = opt.h[k], sums[j]
            if tuple(cur.shape) != s.shape or _dtype_of(cur) != s.dtype:
                raise _err(f"state[{j}]['sum'] is {s.dtype}{list(s.shape)} but parameter "
                           f"{k!r} is {_dtype_of(cur)}{list(cur.shape)}", where)
            if isinstance(cur, np.ndarray) and not cur.flags.writeable:
                raise _err(f"the optimizer's accumulator for parameter {k!r} is "
                           "read-only; it is loaded in place", where)
        copies = [(opt.h[k], sums[j]) for k, j in zip(keys, order)]
    elif sums:
        copies = []
        if params is not None:
            if not isinstance(params, (Mapping, list, tuple)):
                raise _err("params must be a dict, a list/tuple of arrays or a "
                           f"FlatBuffer, got {type(params).__name__}", where)
            pkeys = list(params.keys()) if isinstance(params, Mapping) \
                else list(range(len(params)))
            if len(pkeys) != len(sums):
                raise _err(f"has state for {len(sums)} parameters, params has "
                           f"{len(pkeys)}", where)
            order = _order(saved, pkeys, isinstance(params, Mapping), "params", where)
            for k, j in zip(pkeys, order):
                p, s = params[k], sums[j]
                pdt = _dtype_of(p)
                if tuple(np.shape(p)) != s.shape or (pdt != s.dtype and not (
                        pdt is not None and is_half(pdt) and s.dtype == np.float32)):
                    raise _err(f"state[{j}]['sum'] is {s.dtype}{list(s.shape)} but "
                               f"params[{k!r}] is {pdt}{list(np.shape(p))}", where)
            sums = [sums[j] for j in order]
            as_dict = isinstance(params, Mapping)
            device = [is_cuda_array(params[k]) for k in pkeys]
            if any(device) and not all(device):
                raise _err("params mixes host and CUDA arrays", where)
        else:
            container = fa.get("container")
            as_dict = saved is not None or container == "dict"
            pkeys = saved if saved is not None else list(range(len(sums)))
            device = [False] * len(sums)
        if isinstance(params, FlatBuffer):
            # the state shares the params' layout: one kernel call over the whole model
            data = np.concatenate([s.reshape(-1) for s in sums]) if sums else np.empty(
                0, params.data.dtype)
            buf = FlatBuffer._from(data, params.layout)
            if is_cuda_array(params.data):
                buf = buf.to_device()
            new_flat = [buf]
            views = [buf[k] for k in pkeys]
        elif all(device):
            from . import cuda

            views = [cuda.to_device_like(s, params[k]) for s, k in zip(sums, pkeys)]
        else:
            # one flat buffer per dtype, views per key: the layout update() creates
            views = [None] * len(sums)
            for dt in _FLOATS:
                idx = [i for i, s in enumerate(sums) if s.dtype == dt]
                if not idx:
                    continue
                buf = FlatBuffer._from(
                    np.concatenate([sums[i].reshape(-1) for i in idx]),
                    tuple(layout_of([(pkeys[i], sums[i]) for i in idx])))
                new_flat.append(buf)
                for i in idx:
                    views[i] = buf[pkeys[i]]
        new_h = dict(zip(pkeys, views)) if as_dict else views
    mkeys = (_keys(opt.h) if opt.h is not None else pkeys) if sums else []
    morder = (order if (opt.h is not None or params is not None)
              else list(range(len(sums)))) if sums else []
    # each master copy where its param's state lies: on the device of a GPU model
    protos = ([opt.h[k] for k in mkeys] if opt.h is not None
              else views if new_h is not None else []) if sums else []
    new_master = {k: _like(np.array(masters[j], np.float32), proto)
                  for k, j, proto in zip(mkeys, morder, protos) if j in masters} or None

    # ---- validated: commit
    if opt.h is not None and sums:
        for cur, s in copies:
            if isinstance(cur, np.ndarray):
                np.copyto(cur, s)
            else:  # device array
                from . import cuda

                cuda.copy_into(cur, s)
        # a GPU cache's device counters and learning rate (capturable=True) are the
        # old run's: the next step rebuilds them from the loaded step and counts
        opt._plan.gpu = None
    else:  # new state, or none at all (a never-stepped checkpoint: a fresh optimizer)
        opt.h, opt._flat = new_h, new_flat
        opt._plan.clear()
        # a dict's state whose keys were not saved: keyed 0..n-1 until the first
        # update's dict names it by position (AdaGrad._update_naming_state)
        opt._positional = bool(sums) and params is None and saved is None and as_dict
    opt.hyper = hyper
    opt.master, opt._half = new_master, None
    opt.rounding, opt.seed = rounding, seed
    opt.master_weights = bool(master_weights) or new_master is not None
    opt.initial_accumulator_value = iav
    opt.step = step if step is not None else 0
    opt.skipped_steps = int(skipped)


# ------------------------------------------------------------------------ files

def checkpoint_path(path: str | bytes | os.PathLike[Any]) -> str:
    """``path`` as :func:`save` writes it: ``.npz`` appended unless it ends with it
    (as ``np.savez`` does); a symbolic link is followed, so the file it points to is
    replaced and the link stays."""
    path = os.fsdecode(os.fspath(path))
    if not path.endswith(".npz"):
        path += ".npz"
    return os.path.realpath(path) if os.path.islink(path) else path


def save(opt: AdaGrad, path: str | bytes | os.PathLike[Any]) -> str:
    """Write ``opt``'s state to ``path`` (one ``.npz``), atomically (see module doc).

    ``.npz`` is appended to ``path`` unless it already ends with it, like
    ``np.savez``; a symbolic link is written through (its target is replaced). Returns
    the path written. Raises FileNotFoundError naming the folder if it does not exist.
    """
    given = os.fsdecode(os.fspath(path))
    path = checkpoint_path(path)
    sd = state_dict(opt, copy=False)
    group = sd["param_groups"][0]
    # order="C", not np.ascontiguousarray: that makes a 0-d accumulator (a scalar
    # parameter's) 1-d, which its parameter would then refuse at load
    arrays = {f"sum_{i}": np.asarray(e["sum"], order="C") for i, e in sd["state"].items()}
    arrays.update({f"master_{i}": np.asarray(e["master"], order="C")
                   for i, e in sd["state"].items() if "master" in e})
    meta = {"format": FORMAT, "version": VERSION,
            "step": int(opt.step) if sd["state"] else None,
            "param_group": group,
            "arrays": {k: {"shape": list(a.shape), "dtype": a.dtype.str}
                       for k, a in arrays.items()}}
    arrays["meta"] = np.array(json.dumps(meta))
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save checkpoint {given!r}: folder "
                                f"{os.path.dirname(given) or directory!r} does not exist")
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
    return path


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


def load(opt: AdaGrad, path: str | bytes | os.PathLike[Any], params: Any = None) -> None:
    """Load a checkpoint written by :func:`save` into ``opt`` (see :func:`load_state_dict`).

    ``path`` is read as given, or with ``.npz`` appended if only that exists (so the
    same name works for :func:`save` and :func:`load`).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated, corrupted, not a fastadagrad checkpoint,
            or does not fit ``opt``; ``opt`` is then unchanged.
    """
    path = os.fsdecode(os.fspath(path))
    if not os.path.exists(path) and not path.endswith(".npz") \
            and os.path.exists(path + ".npz"):
        path += ".npz"
    where = f"checkpoint {path!r}"
    try:
        fh = open(path, "rb")
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except OSError as e:
        raise _err(f"cannot be opened ({type(e).__name__}: {e})", where) from e
    try:
        # our own file object: np.load leaks its file when a broken zip makes it fail
        with fh:
            sd = _read(fh, where)
    except CheckpointError:
        raise
    except Exception as e:  # a damaged file can make zipfile/np.load raise anything
        raise _err(f"cannot be read, truncated or corrupted ({type(e).__name__}: {e})",
                   where) from e
    load_state_dict(opt, sd, params, where=where)


def _read(fh: Any, where: str) -> dict[str, Any]:
    """The state dict stored in an open checkpoint file, its index checked."""
    z = np.load(fh, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise _err("not a fastadagrad checkpoint (a single .npy array, not a .npz)", where)
    with z:
        if "meta" not in z.files:
            raise _err("not a fastadagrad checkpoint (no 'meta' entry)", where)
        meta = json.loads(str(z["meta"][()]))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise _err("not a fastadagrad checkpoint (unknown format)", where)
        if meta.get("version") != VERSION:
            raise _err(f"format version {meta.get('version')!r}; this fastadagrad reads "
                       f"version {VERSION}", where)
        specs = meta.get("arrays")
        if not isinstance(specs, dict) or not all(
                isinstance(v, dict) and set(v) == {"shape", "dtype"} for v in specs.values()):
            raise _err("its index of arrays is malformed", where)
        if sorted(specs) != sorted(f for f in z.files if f != "meta"):
            raise _err(f"entries {sorted(z.files)} do not match its index "
                       f"{sorted(specs)}", where)
        arrays = {k: z[k] for k in specs}  # each member read whole: CRC checked
    for k, spec in specs.items():
        a = arrays[k]
        if list(a.shape) != spec["shape"] or a.dtype.str != spec["dtype"]:
            raise _err(f"entry {k!r} is {a.dtype.str}{list(a.shape)}, its index says "
                       f"{spec['dtype']}{spec['shape']}", where)
    n = sum(1 for k in specs if k.startswith("sum_"))
    if sorted(k for k in specs if not k.startswith("master_")) != sorted(
            f"sum_{i}" for i in range(n)) or not all(
            k[len("master_"):] in {str(i) for i in range(n)}
            for k in specs if k.startswith("master_")):
        raise _err(f"entries {sorted(specs)} are not sum_0..sum_{n - 1} (and master_<i>)",
                   where)
    step = meta.get("step")
    if n and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise _err(f"its step must be a whole number >= 0, got {step!r}", where)
    group = meta.get("param_group")
    if not isinstance(group, dict):
        raise _err("its param group is missing or malformed", where)
    state: dict[int, dict[str, Any]] = {
        i: {"sum": arrays[f"sum_{i}"], "step": np.float64(step or 0)} for i in range(n)}
    for i in range(n):
        if f"master_{i}" in arrays:
            state[i]["master"] = arrays[f"master_{i}"]
    return {"state": state,
            "param_groups": [group]}
