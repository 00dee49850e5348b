"""Certificates of death (`relumon.proof`): each proof holds where it says, and refuses with the reason elsewhere.

Ground truth is forced: planted zero scales, shifts far below the Samuelson bound, non-positive rows after a ReLU.
Positive cases train further and check, with plain forward hooks, that no certified unit ever fires again.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Optional

import pytest
import torch
from torch import nn

import relumon
from relumon.proof import Certification

QUIET = {"on_dead": lambda report: None, "measure_every": 1}


def mlp(units: int = 6) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, units), nn.BatchNorm1d(units), nn.ReLU(), nn.Linear(units, 5), nn.ReLU(), nn.Linear(5, 2)
    )


def plant(model: nn.Sequential) -> None:
    """Unit 0: zero scale, shift -0.5. Unit 1: shift -1, scale 0.1 (the bound for M = 16: 0.1 * sqrt(15) < 1).
    Second site unit 2: non-positive row and bias after a ReLU."""
    with torch.no_grad():
        model[1].weight[0] = 0.0
        model[1].bias[0] = -0.5
        model[1].weight[1] = 0.1
        model[1].bias[1] = -1.0
        model[3].weight[2] = -model[3].weight[2].abs()
        model[3].bias[2] = -0.1


def steps(model: nn.Module, opt: Optional[torch.optim.Optimizer], n: int, batch: int = 16, scale: float = 1.0) -> None:
    for _ in range(n):
        loss = model(scale * torch.randn(batch, 8)).pow(2).mean()
        if opt is not None:
            opt.zero_grad()
        loss.backward()
        if opt is not None:
            opt.step()


def certify(model: nn.Module, opt: Any, n: int = 3, before_report: Callable[[], None] = lambda: None, **kw: Any) -> Any:
    monitor = relumon.watch(model, certify=True, optimizer=opt, **QUIET, **kw)
    steps(model, opt, n)
    before_report()
    report = monitor.report()
    monitor.remove()
    return report


def cert(report: Any, name: str) -> Certification:
    c = report[name].certified
    assert c is not None
    return c


def test_each_proof_holds_and_no_certified_unit_fires_again() -> None:
    torch.manual_seed(0)
    model = mlp()
    plant(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=1e-3)
    report = certify(model, opt)
    first, second = cert(report, "2"), cert(report, "4")
    assert {u: p.kind for u, p in first.units.items()} == {0: "zero-scale", 1: "batchnorm-bound"}
    assert first.values_per_channel == 16 and first.units[1].max_values == 100
    assert {u: p.kind for u, p in second.units.items()} == {2: "nonnegative-input"}
    for layer in report:  # certified units are dead in the window too
        assert set(cert(report, layer.name).indices) <= set(layer.dead_indices)
    # Train on, with inputs 100 times larger, and watch every forward of the certified batch shape with plain hooks.
    fired = {"2": torch.zeros(6, dtype=torch.bool), "4": torch.zeros(5, dtype=torch.bool)}

    def watch_site(key: str) -> Any:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            fired[key].logical_or_(out.detach().amax(0) > 0)

        return hook

    handles = [model[i].register_forward_hook(watch_site(str(i))) for i in (2, 4)]
    steps(model, opt, 200, scale=100.0)
    # A Samuelson extremal batch: 15 equal rows and one far away, in both directions.
    extreme = torch.zeros(16, 8)
    extreme[0] = 1e4
    model(extreme)
    model(-extreme)
    for h in handles:
        h.remove()
    assert not fired["2"][[0, 1]].any() and not fired["4"][2]
    # Zero-scale and non-negative-input proofs hold in eval mode, on any batch size.
    model.eval()
    with torch.no_grad():
        x = 50 * torch.randn(1000, 8)
        assert (model[:3](x)[:, 0] == 0).all()
        assert (model[:5](x)[:, 2] == 0).all()


def test_conv_batchnorm_bound_is_per_values_per_channel() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 2))
    with torch.no_grad():  # M = N*H*W = 4*8*8 = 256: needs shift <= -sqrt(255) |scale| ~ -15.97 |scale|
        net[1].weight[:] = 1.0
        net[1].bias[:] = torch.tensor([-16.1, -15.0, 0.0, 0.0])
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    monitor = relumon.watch(net, certify=True, optimizer=opt, **QUIET)
    net(torch.randn(4, 3, 8, 8)).sum().backward()
    c = cert(monitor.report(), "2")
    monitor.remove()
    assert c.values_per_channel == 256
    assert list(c.units) == [0] and c.units[0].max_values == 259  # (16.1 / (1 + 2**-10))**2 + 1 = 259.6


class Skip(nn.Module):
    """relu(bn(lin(x)) + x): the ReLU's input is a sum (a skip connection adds to the BatchNorm's output)."""

    def __init__(self, units: int = 6) -> None:
        super().__init__()
        self.lin, self.bn, self.relu = nn.Linear(units, units), nn.BatchNorm1d(units), nn.ReLU()
        self.head = nn.Linear(units, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.bn(self.lin(x)) + x))


class TwoReaders(Skip):
    """The BatchNorm's output is read by the ReLU and by the output (a second consumer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.lin(x))
        return self.head(self.relu(h)) + h.sum(1, keepdim=True)


def mlp_6() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


def _steps6(model: nn.Module, opt: Any, n: int) -> None:
    for _ in range(n):
        loss = model(torch.randn(16, 6)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _certify_without_step(model: nn.Module, opt: Any, before: Callable[[], Any] = lambda: None) -> Any:
    """A training forward and backward (no optimizer step: the planted values stay), then the report."""
    monitor = relumon.watch(model, certify=True, optimizer=opt, **QUIET)
    model.zero_grad()
    model(torch.randn(16, 6)).pow(2).mean().backward()
    before()
    report = monitor.report()
    monitor.remove()
    return report


CASES = {
    # case: (words the reason must hold, the unit: 0 is the planted zero-scale, 1 the BatchNorm bound)
    "skip connection": ("skip connection", 0),
    "second consumer": ("second consumer", 0),
    "eval mode": ("eval mode", 1),
    "sgd momentum left": ("momentum left", 0),
    "adam momentum left": ("exp_avg", 0),
    "decay lifts the shift": ("faster than its scale", 1),
    "coupled adam decay": ("coupled weight decay", 0),
    "momentum with decay": ("momentum with weight decay", 0),
    "decay flips the sign": ("flips its sign", 0),
    "unknown optimizer": ("allow-list", 0),
    "no optimizer": ("no optimizer", 0),
    "gradient from outside": ("non-zero gradient", 0),
    "tied weights": ("tied", 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_adversarial_cases_are_refused_with_the_reason(case: str) -> None:
    torch.manual_seed(0)
    expected, unit = CASES[case]
    model: Any = {"skip connection": Skip, "second consumer": TwoReaders}.get(case, mlp_6)()
    bn = model.bn if isinstance(model, Skip) else model[1]
    site = "relu" if isinstance(model, Skip) else "2"
    before: Callable[[], Any] = model.zero_grad  # nothing that changes the report
    opt: Any = torch.optim.SGD(model.parameters(), lr=0.1)
    if case in ("sgd momentum left", "adam momentum left"):
        opt = (
            torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            if case.startswith("sgd")
            else torch.optim.Adam(model.parameters(), lr=0.01)
        )
        with torch.no_grad():  # alive first, so that the optimizer's state fills
            bn.weight[0], bn.bias[0] = 1.0, 1.0
        _steps6(model, opt, 2)
    elif case == "eval mode":
        before = model.eval
    elif case == "decay lifts the shift":
        others = [p for p in model.parameters() if p is not bn.bias]
        opt = torch.optim.SGD([{"params": [bn.bias], "weight_decay": 0.1}, {"params": others}], lr=0.1)
    elif case == "coupled adam decay":
        opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1)
    elif case == "momentum with decay":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.1)
    elif case == "decay flips the sign":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=30.0)
    elif case == "unknown optimizer":
        opt = torch.optim.RMSprop(model.parameters(), lr=0.01)
    elif case == "no optimizer":
        opt = None
    elif case == "gradient from outside":

        def before() -> None:
            (bn.weight.sum() + bn.bias.sum()).backward()  # a penalty on the weights, outside the forward

    elif case == "tied weights":
        model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
        model[2].weight = model[0].weight
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        site = "1"
    with torch.no_grad():
        if case == "tied weights":
            model[0].weight[0], model[0].bias[0] = 0.0, -0.5  # zero-filter
        else:
            bn.weight[0], bn.bias[0] = 0.0, -0.5  # zero-scale
            bn.weight[1], bn.bias[1] = 0.1, -1.0  # the BatchNorm bound for M = 16
    report = _certify_without_step(model, opt, before)
    c = cert(report, site)
    assert unit not in c.units
    reason = c.refused.get(unit, c.why_not)
    assert reason is not None and expected in reason, (case, c)
    assert "proven dead" in report[site]._repr_html_()  # the report says why


def test_the_same_cases_without_the_flaw_are_certified() -> None:
    """The control: the plain model with plain SGD (and coupled decay) certifies both planted units, so the
    refusals above are the flaws' doing."""
    torch.manual_seed(0)
    model = mlp_6()
    with torch.no_grad():
        model[1].weight[0], model[1].bias[0] = 0.0, -0.5
        model[1].weight[1], model[1].bias[1] = 0.1, -1.0
    c = cert(_certify_without_step(model, torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)), "2")
    assert {u: p.kind for u, p in c.units.items()} == {0: "zero-scale", 1: "batchnorm-bound"}
    assert not c.refused


def test_switching_certified_units_off_changes_no_output() -> None:
    torch.manual_seed(0)
    model = mlp(12)
    with torch.no_grad():
        model[1].weight[:4] = 0.05
        model[1].bias[:4] = -2.0
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    report = certify(model, opt, n=5)
    units = cert(report, "2").indices
    assert units == [0, 1, 2, 3]
    off = copy.deepcopy(model)
    with torch.no_grad():
        off[3].weight[:, units] = 0
    held_out = torch.randn(64, 8) * 10
    for mode in (True, False):
        model.train(mode), off.train(mode)
        a = torch.cat([copy.deepcopy(model)(held_out[i : i + 16]) for i in range(0, 64, 16)])
        b = torch.cat([copy.deepcopy(off)(held_out[i : i + 16]) for i in range(0, 64, 16)])
        if mode:  # the certificate is for training-mode batches of 16
            assert torch.equal(a, b)


def test_report_marks_certified_units_apart() -> None:
    torch.manual_seed(0)
    model = mlp()
    plant(model)
    report = certify(model, torch.optim.SGD(model.parameters(), lr=0.05))
    text = str(report)
    assert "proven" in text.splitlines()[1] and "only looked dead" in text
    row = report["2"].to_dict()
    assert row["certified_units"] == 2 and set(row["certified"]["units"]) == {"0", "1"}
    assert row["certified"]["units"]["1"]["kind"] == "batchnorm-bound"
    assert report.scalars()["relumon/certified_units/2"] == 2.0
    html = report._repr_html_()
    assert "<th title='proven: units certified dead" in html
    message = relumon.report.dead_layer_message(report["2"])
    assert "Proven dead for every input: 2 of 6 units" in message


def test_no_certify_no_field_and_no_probe() -> None:
    model = mlp()
    monitor = relumon.watch(model, **QUIET)
    assert monitor._certifier is None
    steps(model, None, 1)
    report = monitor.report()
    monitor.remove()
    assert report["2"].certified is None and report["2"].to_dict()["certified"] is None
    assert "proven" not in str(report)
    with pytest.raises(TypeError, match="certify"):
        relumon.watch(model, certify="yes")


def test_functional_and_leaky_sites_get_a_reason() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.act, self.head = nn.Linear(8, 4), nn.LeakyReLU(), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.act(self.lin(x)))

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    report = certify(model, opt)
    c = cert(report, "act")
    assert not c.units and c.why_not is not None and "nn.ReLU/nn.ReLU6" in c.why_not
    assert math.isfinite(report["act"].grad_norm)


def test_digits_example_certified_units_switched_off_change_no_held_out_output() -> None:
    """The docs' measurement (examples/proof_of_death.py): certified units are a subset of the window's dead ones,
    and zeroing their outgoing weights leaves every output on the held-out digits unchanged."""
    pytest.importorskip("sklearn")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "proof_of_death.py"
    spec = importlib.util.spec_from_file_location("proof_of_death", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main()
    second = results["mlp"]["5"]
    assert second.certified is not None and 0 < len(second.certified) <= second.dead_units
    assert set(second.certified.indices) <= set(second.dead_indices)
    assert results["same_train"] and results["accuracy"] > 0.8
    conv = results["conv"]["5"]
    assert conv.certified is not None and conv.certified.values_per_channel == 16 * 8 * 8
    assert len(conv.certified) < conv.dead_units


def test_gradient_flow_picture_labels_proven_apart() -> None:
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = mlp()
    plant(model)
    report = certify(model, torch.optim.SGD(model.parameters(), lr=0.05))
    figure = report.plot()
    labels = [t.get_text() for t in figure.axes[0].texts]
    dead = round(100 * report["2"].dead_fraction)
    assert f"{dead}% dead\n33% proven" in labels  # 2 of 6 units proven


def test_the_float_caveat_of_the_batchnorm_bound_is_real_and_stated() -> None:
    """The documented limit: float32 BatchNorm on a nearly constant channel far from 0 exceeds Samuelson's bound,
    while a well-conditioned extremal batch stays within the rounding room. The proof says so in `holds_for`."""
    m = 16
    bn = nn.BatchNorm1d(1)
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.bias.fill_(0.0)

        def top(offset: float, spread: float) -> float:
            x = torch.full((m, 1), offset)
            x[0, 0] += spread
            return float(bn(x).max()) / math.sqrt(m - 1)

        assert top(0.0, 1.0) <= 1 + relumon.proof.ROUNDING_ROOM
        assert top(1e3, 1.0) <= 1 + relumon.proof.ROUNDING_ROOM  # |mean| / std about 4e3
        assert top(1e6, 1e-3) > 2.0  # |mean| / std about 4e9: rounding, not statistics
    torch.manual_seed(0)
    model = mlp()
    plant(model)
    proof = cert(certify(model, torch.optim.SGD(model.parameters(), lr=0.05)), "2").units[1]
    assert proof.kind == "batchnorm-bound" and relumon.proof.FLOAT_CAVEAT in proof.holds_for


def test_lightning_callback_certifies_with_the_trainers_optimizer() -> None:
    """A real Trainer: ReluMonitor(certify=True) hands the Trainer's optimizer to the proofs; a layer fed by a ReLU
    through non-positive weights and biases is proven dead, and the alert says so."""
    from tests.lightning_helpers import boring_module, import_namespace, loader, trainer

    pl = import_namespace("lightning.pytorch")
    from relumon.lightning import ReluMonitor

    module = boring_module(pl, dead_fc2=True, lr=0.01)
    with torch.no_grad():
        module.net[2].weight.copy_(-module.net[2].weight.abs())
    callback = ReluMonitor(certify=True, measure_every=1, on_dead="warn")
    with pytest.warns(relumon.DeadUnitsWarning, match="Proven dead for every input: 12 of 12 units"):
        trainer(pl, [callback]).fit(module, loader())
    report = callback.last_report
    assert report is not None
    second = cert(report, "net.3")
    assert second.indices == list(range(12)) and {p.kind for p in second.units.values()} == {"nonnegative-input"}
    assert not cert(report, "net.1").units


def test_batchnorm_bound_never_fails_on_random_and_extremal_batches() -> None:
    """Many random BatchNorm channels and batch sizes: wherever `closing_proof` proves a unit for M values per channel,
    no batch of at most M values (random, heavy-tailed, or Samuelson-extremal: one outlier) makes it positive."""
    from relumon.proof import Feed, closing_proof

    torch.manual_seed(0)  # for the Student-t draws
    gen = torch.Generator().manual_seed(0)
    proven = 0
    for trial in range(200):
        m = int(torch.randint(2, 65, (1,), generator=gen))
        bn = nn.BatchNorm1d(4)
        with torch.no_grad():
            bn.weight.copy_(torch.randn(4, generator=gen) * 2)
            bn.bias.copy_(-torch.rand(4, generator=gen) * 3 * math.sqrt(m - 1) * bn.weight.abs())
        feed = Feed("site", units=4, norm=bn, norm_path="bn", values_per_channel=m)
        units = [u for u in range(4) if closing_proof(feed, u)[0] is not None]
        proven += len(units)
        for rows in (m, max(2, m // 2)):
            batches = [
                torch.randn(rows, 4, generator=gen) * 10 ** float(torch.randint(-3, 4, (1,), generator=gen)),
                torch.distributions.StudentT(1.0).sample((rows, 4)),
            ]
            outlier = torch.zeros(rows, 4)
            outlier[trial % rows] = 1e3
            batches += [outlier, -outlier]
            with torch.no_grad():
                for x in batches:
                    assert (bn(x)[:, units] <= 0).all(), (trial, m, rows)
    assert proven > 100  # the bound was exercised, not vacuous


def test_units_along_another_dim_get_a_reason_not_a_wrong_index() -> None:
    torch.manual_seed(0)
    model = mlp()
    plant(model)
    report = certify(model, torch.optim.SGD(model.parameters(), lr=0.05), unit_dim={"2": 0})
    c = cert(report, "2")
    assert report["2"].unit_dim == 0 and not c.units and c.why_not == "its units are along dim 0, not dim 1"
