"""``relumon check PATH``: what the saved weights alone say, for CI and release gates.

    relumon check model.pt
    relumon check ckpt.ckpt --model mypkg.models:build --fail-on warning --json
    relumon check new.pt --against old.pt

It reads a ``state_dict`` saved with ``torch.save``, a Lightning checkpoint (its ``state_dict`` key; a common
``model.`` prefix is stripped when the weights are loaded into ``--model``) or, with ``--whole-model``, a whole model
saved with ``torch.save(model)``. Plain weights are loaded with ``torch.load(weights_only=True)``, which runs no code
from the file; a whole model needs ``weights_only=False``, which runs code stored in the file: hence the explicit
flag, for files you trust.

What it reports, each with a severity:

- **error**: tensors holding NaN or Inf;
- **warning**: all-zero weight tensors; units **proven dead** for every input (`relumon.proof`) where the wiring is
  known: from a whole model, or from the class given with ``--model pkg.module:callable`` (built, loaded with the
  weights, and run once on a tiny random input in training mode to read the wiring from its autograd graph); and,
  from the weights alone, BatchNorm channels with scale exactly 0 and shift ``<= 0``, which are dead *if a ReLU
  directly follows* (the weights cannot show what follows);
- **info**: units the Samuelson BatchNorm bound proves dead in training mode for batches of at most M values per
  channel (their M is named; with ``--values-per-channel M`` those that hold for M become warnings); BatchNorm
  channels that are **probably dormant, an estimate and not a proof**: shift ``<= -3 |scale|``, so a ReLU after them
  would fire on about ``Phi(shift / |scale|)`` of the values *if* the normalised input were standard normal.
  (All-zero biases and running statistics are not reported: they start at 0.)

The permanence of a death (what an optimizer may still do) is not checked: a weights file holds no optimizer.
The exit status is 1 when a finding is at or above ``--fail-on`` (default ``error``), 2 for a bad file or argument
(one line on stderr), else 0. ``--against OLD`` also lists the units dead in PATH that were not dead in OLD.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import pickle
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["SEVERITIES", "Finding", "CheckError", "load_checkpoint", "check_weights", "check_path", "main"]

SEVERITIES = ("info", "warning", "error")
#: A BatchNorm channel with shift <= -DORMANT_RATIO * |scale| is called probably dormant (an estimate).
DORMANT_RATIO = 3.0
EXIT_FOUND, EXIT_USAGE = 1, 2


class CheckError(Exception):
    """A bad file or argument: said in one line, exit status 2."""


@dataclass(frozen=True)
class Finding:
    """One thing the check found.

    Attributes:
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        kind: ``"nonfinite"``, ``"all-zero"``, ``"proven-dead"``, ``"dead-if-relu-follows"``, ``"bound-dead"`` (the
            BatchNorm bound, training mode, up to some M) or ``"probably-dormant"``.
        where: the tensor, module or call site.
        units: the units (channels) concerned, if any.
        message: the finding in words.
    """

    severity: str
    kind: str
    where: str
    units: tuple[int, ...]
    message: str

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "severity": self.severity,
            "kind": self.kind,
            "where": self.where,
            "units": list(self.units),
            "message": self.message,
        }


#: Kinds that mean "dead", for ``--against``.
DEAD_KINDS = ("proven-dead", "dead-if-relu-follows")


def _units(indices: Sequence[int], limit: int = 16) -> str:
    text = ", ".join(str(i) for i in indices[:limit])
    return text + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


def load_checkpoint(path: str, whole_model: bool = False) -> tuple[dict[str, Tensor], Optional[nn.Module]]:
    """The state_dict in ``path`` and, for a whole model (``whole_model=True``), the model.

    Raises:
        CheckError: a missing or unreadable file, pickled objects without ``whole_model``, no state_dict inside.
    """
    if not os.path.isfile(path):
        raise CheckError(f"no such file: {path}")
    try:
        if whole_model:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise CheckError(
                f"{path} holds pickled Python objects (a whole model saved with torch.save(model)?). Rerun with "
                "--whole-model to load it with torch.load(weights_only=False), which runs code stored in the file: "
                "only for files you trust"
            ) from None
        last = (str(err).strip().splitlines() or [""])[-1].strip()
        raise CheckError(f"{path} is not a file torch.load can read (UnpicklingError: {last[:200]})") from None
    except Exception as err:  # a truncated zip, a text file...
        first = (str(err).splitlines() or [""])[0]
        raise CheckError(f"{path} is not a file torch.load can read ({type(err).__name__}: {first})") from None
    model = obj if isinstance(obj, nn.Module) else None
    state = _find_state_dict(obj)
    if state is None:
        raise CheckError(
            f"no state_dict in {path}: expected a dict of tensors, a Lightning checkpoint (a `state_dict` key) or a "
            f"whole model, got {type(obj).__name__}"
        )
    return state, model


def _find_state_dict(obj: Any) -> Optional[dict[str, Tensor]]:
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if not isinstance(obj, dict):
        return None
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if tensors and len(tensors) == len(obj):
        return tensors
    for key in ("state_dict", "model_state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, (dict, nn.Module)):
            found = _find_state_dict(inner)
            if found:
                return found
    return tensors or None


def _batchnorms(state: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """``{module path: (scale, shift)}`` for the BatchNorm-like entries of a state_dict (weight, bias and running
    statistics of one 1-D shape)."""
    found = {}
    for key, weight in state.items():
        if not key.endswith(".weight") and key != "weight":
            continue
        prefix = key[: -len("weight")]
        bias, mean, var = (state.get(prefix + s) for s in ("bias", "running_mean", "running_var"))
        if bias is None or mean is None or var is None or weight.ndim != 1:
            continue
        if not (weight.shape == bias.shape == mean.shape == var.shape):
            continue
        found[prefix.rstrip(".")] = (weight.detach().float(), bias.detach().float())
    return found


def check_weights(state: dict[str, Tensor]) -> list[Finding]:
    """Findings from the weights alone: NaN/Inf, all-zero tensors, zero-scale BatchNorm channels (dead if a ReLU
    directly follows), probably dormant BatchNorm channels (an estimate)."""
    findings = []
    for key, t in state.items():
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.numel() == 0:
            continue
        bad = int((~t.isfinite()).sum())
        if bad:
            findings.append(Finding("error", "nonfinite", key, (), f"{bad} of {t.numel()} values are NaN or Inf"))
            continue
        last = key.rsplit(".", 1)[-1]
        # Biases and running statistics start at 0: only all-zero weights (a whole layer switched off) are news.
        if last in ("bias", "running_mean", "running_var", "num_batches_tracked") or bool((t != 0).any()):
            continue
        findings.append(Finding("warning", "all-zero", key, (), f"all {t.numel()} values are 0"))
    for path, (scale, shift) in _batchnorms(state).items():
        if not (bool(scale.isfinite().all()) and bool(shift.isfinite().all())):
            continue
        zero = ((scale == 0) & (shift <= 0)).nonzero().flatten().tolist()
        if zero:
            findings.append(
                Finding(
                    "warning",
                    "dead-if-relu-follows",
                    path,
                    tuple(zero),
                    f"{len(zero)} channel(s) with scale 0 and shift <= 0 (units {_units(zero)}): the output is the "
                    f"shift, so they are dead if a ReLU directly follows `{path}` and nothing adds to its output "
                    "(the weights alone cannot show the wiring: --model proves it)",
                )
            )
        ratio = shift / scale.abs()
        dormant = ((scale != 0) & (ratio <= -DORMANT_RATIO)).nonzero().flatten().tolist()
        if dormant:
            worst = float(ratio[dormant].max())
            share = 0.5 * math.erfc(-worst / math.sqrt(2.0))
            about = f"about {share:.1e}" if share >= 1e-12 else "less than 1e-12"
            findings.append(
                Finding(
                    "info",
                    "probably-dormant",
                    path,
                    tuple(dormant),
                    f"{len(dormant)} channel(s) probably dormant, an estimate and not a proof (units "
                    f"{_units(dormant)}): shift <= {-DORMANT_RATIO:g} |scale|, so a ReLU after them would fire on "
                    f"{about} of the values if the normalised input were standard normal",
                )
            )
    return findings


def _build(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CheckError(f"expected --model as pkg.module:callable, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise CheckError(f"cannot import {module_name!r} for --model: {type(err).__name__}: {err}") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise CheckError(f"{module_name!r} has no callable {attr!r} for --model")
    try:
        model = factory()
    except Exception as err:
        raise CheckError(f"--model {spec} failed when called with no arguments: {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise CheckError(f"--model {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_into(model: nn.Module, state: dict[str, Tensor], spec: str) -> str:
    """Load ``state`` into ``model``; returns the key prefix stripped (a Lightning module's ``model.``) or ``""``."""
    keys = set(model.state_dict())
    candidates = [("", state)]
    first = {k.split(".", 1)[0] for k in state}
    if len(first) == 1 and all("." in k for k in state):  # a Lightning module's attribute prefix, e.g. `model.`
        prefix = next(iter(first)) + "."
        candidates.append((prefix, {k[len(prefix) :]: v for k, v in state.items()}))
    for prefix, candidate in candidates:
        if set(candidate) == keys:
            try:
                model.load_state_dict(candidate)
                return prefix
            except RuntimeError as err:
                lines = [line.strip() for line in str(err).splitlines() if line.strip()]
                # torch's first line only says "Error(s) in loading state_dict for X:"; the next says which tensor.
                said = next((line for line in lines if "size mismatch" in line), lines[0] if lines else "")
                raise CheckError(f"the weights do not fit --model {spec}: {said}") from None
    missing = sorted(keys - set(candidates[-1][1]))[:3]
    unexpected = sorted(set(candidates[-1][1]) - keys)[:3]
    raise CheckError(f"the weights do not fit --model {spec}: missing keys {missing}, unexpected keys {unexpected}")


def _tiny_input(model: nn.Module, shape: Optional[Sequence[int]]) -> Tensor:
    if shape is not None:
        return torch.randn(*shape)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return torch.randn(2, module.in_features)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            spatial = {nn.Conv1d: (16,), nn.Conv2d: (16, 16), nn.Conv3d: (8, 8, 8)}[type(module)]
            return torch.randn(2, module.in_channels, *spatial)
        if isinstance(module, nn.Embedding):
            return torch.randint(0, module.num_embeddings, (2, 8))
    raise CheckError("cannot guess an input for the dry forward: give --input-shape, e.g. --input-shape 2,3,32,32")


def check_model(
    model: nn.Module, input_shape: Optional[Sequence[int]] = None, values_per_channel: Optional[int] = None
) -> tuple[list[Finding], set[str]]:
    """Units proven dead in ``model``, with the wiring read from one dry training-mode forward on a tiny input.

    The model's mode and its BatchNorm running statistics are restored afterwards.

    Returns:
        The findings, and the paths of the BatchNorms whose zero-scale channels need no "dead if a ReLU directly
        follows" hint: those the wiring shows feeding a ReLU (their deaths are proven here) and those it shows
        feeding no ReLU as is (the hint would be false).
    """
    from relumon.proof import FLOAT_CAVEAT, Certifier, closing_proof

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    certifier = Certifier(model)
    # Which BatchNorms the dry forward ran, and whether a ReLU reads their output as is: where none does (a residual
    # add between, as in a zero-initialised residual branch), "dead if a ReLU directly follows" is known to be false.
    norm_out: dict[str, list[Any]] = {}
    relu_in: list[Any] = []
    handles = []
    for path, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):

            def keep(module: nn.Module, args: Any, out: Any, path: str = path) -> None:
                if isinstance(out, Tensor):
                    norm_out.setdefault(path, []).append(out.grad_fn)

            handles.append(module.register_forward_hook(keep))
        elif isinstance(module, (nn.ReLU, nn.ReLU6)):

            def read(module: nn.Module, args: Any) -> None:
                if args and isinstance(args[0], Tensor):
                    relu_in.append(args[0].grad_fn)

            handles.append(module.register_forward_pre_hook(read))
    try:
        model.train()
        x = _tiny_input(model, input_shape)
        with torch.enable_grad():
            try:
                model(x)
            except Exception as err:
                raise CheckError(
                    f"the dry forward on a random input of shape {tuple(x.shape)} failed ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''}): give --input-shape"
                ) from None
        feeds = certifier.feeds(model) or {}
    finally:
        for handle in handles:
            handle.remove()
        certifier.remove()
        model.load_state_dict(saved)
        model.train(was_training)
    findings = []
    read_by_relu = {id(node) for node in relu_in if node is not None}
    norms = {p for p, nodes in norm_out.items() if not any(id(n) in read_by_relu for n in nodes if n is not None)}
    for name, feed in feeds.items():
        if feed.problem is not None:
            continue
        if feed.norm is not None:
            norms.add(feed.norm_path)
        feed.values_per_channel = 2  # the smallest batch: each BatchNorm-bound proof then names its own largest M
        by_kind: dict[tuple[str, str], list[int]] = {}
        bound: dict[int, int] = {}
        for unit in range(feed.units):
            proof, _ = closing_proof(feed, unit, training=True)
            if proof is None:
                continue
            if proof.kind == "batchnorm-bound":
                assert proof.max_values is not None
                bound[unit] = proof.max_values
            else:
                by_kind.setdefault((proof.kind, proof.holds_for), []).append(unit)
        for (kind, holds_for), units in by_kind.items():
            findings.append(
                Finding(
                    "warning",
                    "proven-dead",
                    name,
                    tuple(units),
                    f"{len(units)} unit(s) proven dead ({kind}) for {holds_for} (units {_units(units)})",
                )
            )
        if bound:
            enough = [u for u, m in bound.items() if values_per_channel is not None and m >= values_per_channel]
            rest = [u for u in bound if u not in enough]
            if enough:
                findings.append(
                    Finding(
                        "warning",
                        "proven-dead",
                        name,
                        tuple(enough),
                        f"{len(enough)} unit(s) proven dead (batchnorm-bound) for every training-mode batch of "
                        f"{values_per_channel} values per channel, {FLOAT_CAVEAT} (units {_units(enough)})",
                    )
                )
            if rest:
                findings.append(
                    Finding(
                        "info",
                        "bound-dead",
                        name,
                        tuple(rest),
                        f"{len(rest)} unit(s) dead in training mode by the BatchNorm bound for batches of at most M "
                        f"values per channel, M from {min(bound[u] for u in rest)} to {max(bound[u] for u in rest)} "
                        f"({FLOAT_CAVEAT}; units {_units(rest)}; set --values-per-channel to your batch's)",
                    )
                )
    return findings, norms


def check_path(
    path: str,
    model_spec: Optional[str] = None,
    whole_model: bool = False,
    input_shape: Optional[Sequence[int]] = None,
    values_per_channel: Optional[int] = None,
) -> list[Finding]:
    """Every finding for the checkpoint at ``path`` (see the module docstring)."""
    state, model = load_checkpoint(path, whole_model)
    findings = check_weights(state)
    prefix = ""
    if model_spec is not None:
        model = _build(model_spec)
        prefix = _load_into(model, state, model_spec)
    if model is not None and not any(f.kind == "nonfinite" for f in findings):
        proven, norms = check_model(model, input_shape, values_per_channel)
        # Named as in the file (a Lightning checkpoint's `model.` prefix kept).
        proven = [dataclasses.replace(f, where=prefix + f.where) for f in proven]
        norms = {prefix + n for n in norms}
        # Where the wiring shows a ReLU right after the BatchNorm, its zero-scale channels are proven instead; where it
        # shows none reading it as is (a residual add between), the hint is false.
        findings = [f for f in findings if not (f.kind == "dead-if-relu-follows" and f.where in norms)] + proven
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(findings, key=lambda f: -order[f.severity])


def dead_units(findings: Sequence[Finding]) -> set[tuple[str, int]]:
    """``(where, unit)`` for every dead (proven, or dead if a ReLU follows) unit."""
    return {(f.where, u) for f in findings if f.kind in DEAD_KINDS for u in f.units}


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes separated by commas, e.g. 2,3,32,32, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return shape


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, got {text!r}")
    return value


def add_parser(commands: Any) -> None:
    """Add the ``check`` subcommand to ``relumon``'s parser."""
    parser = commands.add_parser("check", help="check saved weights: dead units, NaN/Inf, all-zero tensors")
    parser.add_argument("path", help="a saved state_dict, Lightning checkpoint or (with --whole-model) whole model")
    parser.add_argument("--model", help="pkg.module:callable that builds the model, to read the wiring")
    parser.add_argument("--fail-on", choices=SEVERITIES, default="error", help="exit 1 at or above this severity")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--against", metavar="OLD", help="an earlier checkpoint: list the units that died since")
    parser.add_argument(
        "--whole-model",
        action="store_true",
        help="load a torch.save(model) file with weights_only=False (runs code from the file: only for files you "
        "trust)",
    )
    parser.add_argument("--input-shape", type=_shape, help="the dry forward's input shape, e.g. 2,3,32,32")
    parser.add_argument(
        "--values-per-channel", type=_positive, help="M of your training batches, for the BatchNorm bound"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``relumon check`` from parsed arguments. Returns the exit status."""
    options = dict(
        model_spec=args.model,
        whole_model=args.whole_model,
        input_shape=args.input_shape,
        values_per_channel=args.values_per_channel,
    )
    try:
        findings = check_path(args.path, **options)
        died: Optional[list[tuple[str, int]]] = None
        if args.against is not None:
            old = check_path(args.against, **options)
            died = sorted(dead_units(findings) - dead_units(old))
    except CheckError as err:
        print(f"relumon check: {err}", file=sys.stderr)
        return EXIT_USAGE
    threshold = SEVERITIES.index(args.fail_on)
    failed = any(SEVERITIES.index(f.severity) >= threshold for f in findings)
    if args.json:
        out: dict[str, Any] = {
            "path": args.path,
            "fail_on": args.fail_on,
            "failed": failed,
            "findings": [f.to_dict() for f in findings],
        }
        if died is not None:
            out["against"] = args.against
            out["died_since"] = [{"where": w, "unit": u} for w, u in died]
        print(json.dumps(out, indent=2))
    else:
        for f in findings:
            print(f"{f.severity:<8} {f.kind:<21} {f.where}: {f.message}")
        if died is not None:
            by_where: dict[str, list[int]] = {}
            for where, unit in died:
                by_where.setdefault(where, []).append(unit)
            print(
                f"died since {args.against}: "
                + ("; ".join(f"{w} units {_units(u)}" for w, u in by_where.items()) or "none")
            )
        counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
        verdict = f"fails at --fail-on {args.fail_on}" if failed else f"passes at --fail-on {args.fail_on}"
        print(
            f"relumon check {args.path}: {counts['error']} error(s), {counts['warning']} warning(s), "
            f"{counts['info']} info: {verdict}"
        )
    return EXIT_FOUND if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``relumon check`` alone (``python -m relumon.check``)."""
    parser = argparse.ArgumentParser(prog="relumon")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["check", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())
