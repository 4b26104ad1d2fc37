"""Stage 2, edit diffusion: the tensorized edit corruption (property tests) and its loss (hand-checked)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onpolicy.diffusion.corruption import edit_tokens
from onpolicy.diffusion.losses import edit_diffusion_loss, masked_diffusion_loss

SPECIALS = (0, 1, 2, 3, 4)  # pad, bos, eos, mask, sep in the test vocabulary
VOCAB = 40


def levenshtein(a: list[int], b: list[int]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def ordinary_mask() -> torch.Tensor:
    ordinary = torch.ones(VOCAB, dtype=torch.bool)
    ordinary[list(SPECIALS)] = False
    return ordinary


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 4), length=st.integers(1, 24), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_edit_corruption_properties(batch, length, seed, data):
    g = torch.Generator().manual_seed(seed)
    # x0 may hold EOS (packed documents): edits may remove or replace it, never write it
    x0 = torch.randint(5, VOCAB, (batch, length), generator=g)
    x0[torch.rand(batch, length, generator=g) < 0.1] = 2
    k = torch.tensor(data.draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch)))
    out = edit_tokens(x0, k, ordinary_mask(), fill_id=3, generator=g)
    assert out.x_t.shape == x0.shape
    assert torch.equal(out.ops.sum(1), k)  # exactly k_t operations applied
    assert torch.equal(out.lengths, length - out.ops[:, 1] + out.ops[:, 2])  # lengths as documented
    for b in range(batch):
        n = int(out.lengths[b])
        edited = out.edited[b, :n].tolist()
        assert levenshtein(x0[b].tolist(), edited) <= int(k[b])
        # edits write ordinary vocabulary tokens only: no special token (mask, pad, EOS, ...) is ever
        # added, so each is at most as frequent as in x0
        for special in SPECIALS:
            assert edited.count(special) <= x0[b].tolist().count(special), (special, edited)
        # the canvas: the edited sequence truncated to L, or filled with MASK up to L
        canvas = out.x_t[b].tolist()
        assert canvas[: min(n, length)] == edited[:length]
        assert all(t == 3 for t in canvas[n:])
        if int(k[b]) == 0:
            assert canvas == x0[b].tolist()


def test_substitutions_change_the_token_and_deletions_shift_left():
    x0 = torch.arange(10, 20)[None]
    ordinary = ordinary_mask()
    for seed in range(20):
        out = edit_tokens(x0, torch.tensor([3]), ordinary, fill_id=3,
                          generator=torch.Generator().manual_seed(seed))
        sub, dele, ins = out.ops[0].tolist()
        # only substitutions: exactly 3 positions differ and the length is kept
        if dele == ins == 0:
            assert (out.x_t != x0).sum() == 3
        if dele == 3:  # only deletions: x0 minus three tokens, in order, then three fills
            kept = out.x_t[0, :7].tolist()
            assert (kept == sorted(kept) and set(kept) < set(range(10, 20))
                    and out.x_t[0, 7:].tolist() == [3, 3, 3])


def test_edit_loss_hand_checked():
    """Two rows, three positions, vocabulary 2. Row 0 edited (all positions count), row 1 not."""
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]],
                                     [[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    x0 = torch.tensor([[0, 1, 1], [0, 0, 1]])
    masked = torch.tensor([[True, False, False], [False, True, False]])
    weight = torch.tensor([2.0, 4.0])
    edited = torch.tensor([True, False])
    loss, stats = edit_diffusion_loss(logits, x0, masked, weight, edited)
    # row 0: masked pos 0 (w 2, -log .5) + visible pos 1 (-log .1) + visible pos 2 (-log .8)
    # row 1: masked pos 1 only (w 4, -log .9); its visible positions do not count
    expected = (2 * -math.log(0.5) - math.log(0.1) - math.log(0.8) + 4 * -math.log(0.9)) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["visible_nll"].item() == pytest.approx((-math.log(0.1) - math.log(0.8)) / 2, rel=1e-6)
    # with no row edited it is exactly the stage-1 ELBO
    plain, _ = masked_diffusion_loss(logits, x0, masked, weight)
    none, _ = edit_diffusion_loss(logits, x0, masked, weight, torch.tensor([False, False]))
    assert torch.isfinite(loss) and none.item() == pytest.approx(plain.item(), rel=1e-6)


class _Recorder(torch.nn.Module):
    """Stands in for a bidirectional model: records the corrupted input and predicts uniformly."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"attention": "bidirectional"})()
        self.seen = None

    def forward(self, input_ids):
        self.seen = input_ids
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, VOCAB, requires_grad=True)})()


@pytest.mark.parametrize("mode", ["mix", "stack"])
def test_stage2_batch_layout_mix_and_stack(mode):
    """mix: about `edit_share` of the rows are edit-corrupted and never masked, the rest are masked and
    never edited; stack: every row is edited, then masked."""
    from onpolicy.config import DiffusionConfig
    from onpolicy.trainers.pretrain import stage1_loss

    mask_id, g = SPECIALS[3], torch.Generator().manual_seed(0)
    x0 = torch.randint(5, VOCAB, (400, 32), generator=torch.Generator().manual_seed(1))
    diff = DiffusionConfig(edit_mode=mode, edit_share=0.25, edit_alpha_max=0.5, t_sampling="stratified")
    model = _Recorder()
    loss, _ = stage1_loss(model, x0, diff, mask_id, g, ordinary=ordinary_mask())
    x_t = model.seen
    is_mask = x_t == mask_id
    fill = is_mask.flip(1).cummin(1).values.flip(1)  # a trailing run of MASK: the canvas filled after
    # deletions
    has_mask = (is_mask & ~fill).any(1)  # masked by the diffusion corruption
    changed = ((x_t != x0) & ~is_mask).any(1)  # an edit left a trace outside the masks
    assert torch.isfinite(loss)
    if mode == "mix":
        assert not (has_mask & changed).any()  # no row is both masked and edited
        share = changed.float().mean().item()
        assert 0.15 < share < 0.30  # edit_share 0.25 (rows with t near 0 get no edits)
        assert has_mask.float().mean().item() > 0.6
    else:
        assert changed.float().mean().item() > 0.8 and (has_mask & changed).float().mean().item() > 0.6


def test_stage2_bench_reuses_only_what_was_made_the_same_way(tmp_path):
    """benchmarks/stage2_edit.py keeps its measurements and trained arms for a re-run, keyed by how they were
    made: another start (or overrides, seed, steps) is refused naming the difference, not silently reused."""
    import importlib.util
    import json
    from pathlib import Path

    import pytest

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "stage2_edit.py"
    spec = importlib.util.spec_from_file_location("stage2_edit", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    key = {"start": "runs/a/final", "limit": 200, "seed": 0}
    # kept before keys existed; the same
    assert bench.made_with(None, key, "x") and bench.made_with(dict(key), key, "x")
    with pytest.raises(SystemExit, match="'start': \\('runs/b/final', 'runs/a/final'\\)"):
        bench.made_with({**key, "start": "runs/b/final"}, key, "x")
    arm = tmp_path / "stage2-s0"
    (arm / "final").mkdir(parents=True)
    (arm / "final" / "config.json").write_text("{}")
    (arm / "stage2_edit_key.json").write_text(json.dumps({"start": "runs/b/final",
                                                          "overrides": ["diffusion.edit_fraction=1"],
                                                          "set": [], "seed": 0, "steps": 20}))
    # reused
    assert bench.train_arm(["diffusion.edit_fraction=1"], 0, 20, Path("runs/b/final"), arm,
                           []) == arm / "final"
    with pytest.raises(SystemExit, match="start"):  # another start: not reused, and nothing trained over it
        bench.train_arm(["diffusion.edit_fraction=1"], 0, 20, Path("runs/a/final"), arm, [])
