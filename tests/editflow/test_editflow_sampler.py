"""EditFlow sampler (tau-leaping) and the model heads: oracle reaches x1, batch == one-by-one,
prompt frozen, save / load round trip."""
import torch

from veomni.diffusion.editflow.align import BLANK, align
from veomni.diffusion.editflow.sampler import editflow_sample
from veomni.models.editflow import EditFlowOutput

BOS, MASK, PAD, V = 1, 95, 96, 97


def _oracle(targets, prompt_lens, rate=50.0):
    """A perfect model for known targets: at each call, align the current tail with the target tail and
    put a high rate (and a one-hot token) exactly on the remaining edits."""

    def forward(ids, mask):
        B, L = ids.shape
        rates = torch.zeros(B, L, 3)
        sub = torch.full((B, L, V), -30.0)
        ins = torch.full((B, L, V), -30.0)
        for b in range(B):
            x = ids[b, :int(mask[b].sum())].tolist()
            p = prompt_lens[b]
            assert x[:p] == targets[b][:p], "the prompt changed"
            z0, z1 = align(x[p:], targets[b][p:])
            nb = p
            for a, c in zip(z0, z1):
                if a == BLANK:
                    rates[b, nb - 1, 2] = rate
                    ins[b, nb - 1, c] = 30.0
                    continue
                if c == BLANK:
                    rates[b, nb, 1] = rate
                elif c != a:
                    rates[b, nb, 0] = rate
                    sub[b, nb, c] = 30.0
                nb += 1
        return EditFlowOutput(rates, sub, ins)

    return forward


def test_oracle_sampler_reaches_x1():
    prompts = [[BOS, 5], [BOS, 7, 8, 9], [BOS]]
    targets = [[BOS, 5, 10, 11, 12, 13, 14, 15, 16], [BOS, 7, 8, 9, 20], [BOS] + list(range(30, 50))]
    for init_masks in (0, 4, 12):
        out = editflow_sample(_oracle(targets, [2, 4, 1]), prompts, bos_id=BOS, mask_id=MASK, pad_id=PAD,
                              seeds=[0, 1, 2], tau=0.05, init_masks=init_masks, max_length=64)
        assert out.sequences == targets, (init_masks, out.sequences)
        assert out.prompt_lens == [2, 4, 1]


def test_sampler_prompt_frozen_and_bos_added():
    # a model that wants to delete and substitute everywhere: the prompt must survive
    def forward(ids, mask):
        B, L = ids.shape
        rates = torch.full((B, L, 3), 100.0)
        return EditFlowOutput(rates, torch.zeros(B, L, V), torch.zeros(B, L, V))

    out = editflow_sample(forward, [[5, 6]], bos_id=BOS, mask_id=MASK, pad_id=PAD, seeds=[3], tau=0.1,
                          init_masks=3, max_length=12)
    assert out.sequences[0][:3] == [BOS, 5, 6] and out.prompt_lens == [3]
    assert len(out.sequences[0]) <= 12


def _tiny_model():
    from tests.models.tiny import tiny_config
    from veomni.models.editflow import attach_editflow_heads
    from veomni.models.registry import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config("llama"))
    model.init_weights()
    model.config.mask_token_id = MASK
    attach_editflow_heads(model, logit_shift=True)
    with torch.no_grad():  # rates that fire now and then
        model.editflow.rate_head.weight.normal_(0, 0.5)
        model.editflow.rate_head.bias.fill_(1.0)
    return model.eval()


def test_batch_equals_one_by_one_tiny_model():
    from veomni.models.editflow import editflow_forward

    model = _tiny_model()

    def forward(ids, mask):
        return editflow_forward(model, ids, mask)

    prompts = [[BOS, 5, 6, 7, 8], [BOS, 9], [BOS, 3, 4]]
    kw = dict(bos_id=BOS, mask_id=MASK, pad_id=PAD, tau=0.2, init_masks=4, max_length=24)
    for temperature in (0.0, 1.0):
        batch = editflow_sample(forward, prompts, seeds=[11, 12, 13], temperature=temperature, **kw)
        alone = [editflow_sample(forward, [p], seeds=[s], temperature=temperature, **kw).sequences[0]
                 for p, s in zip(prompts, [11, 12, 13])]
        assert batch.sequences == alone
        assert any(len(r) != len(p) + 4 for r, p in zip(batch.sequences, prompts))  # lengths did change
        for r, p in zip(batch.sequences, prompts):
            assert r[:len(p)] == p


def test_editflow_checkpoint_save_load_roundtrip(tmp_path):
    from veomni.models.editflow import editflow_forward, has_editflow_heads
    from veomni.models.hf_io import load_model, save_model

    model = _tiny_model()
    save_model(model, tmp_path / "ef")
    back = load_model(tmp_path / "ef")
    assert has_editflow_heads(back) and back.editflow.logit_shift
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sorted(sd) == sorted(sd2) and any(k.startswith("editflow.") for k in sd)
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    ids = torch.tensor([[BOS, 5, 6, MASK]])
    a = editflow_forward(model, ids, torch.ones_like(ids))
    b = editflow_forward(back, ids, torch.ones_like(ids))
    assert torch.equal(a.rates, b.rates) and torch.equal(a.sub_logits, b.sub_logits)
    # both heads start as the LM head; the sub head reads row i - 1 (logit shift), the insert head row i
    assert torch.equal(a.sub_logits[0, 1:], a.ins_logits[0, :-1])
    assert not torch.equal(a.sub_logits[0, 1:], a.ins_logits[0, 1:])
    assert a.sub_logits.shape == (1, 4, V) and a.rates.shape == (1, 4, 3) and (a.rates >= 0).all()


def test_live_view_marks_edits(smollm2_dir):
    import io

    from veomni.inference.editflow import EditLiveView, render_events
    from veomni.models.hf_io import load_tokenizer

    tok = load_tokenizer(str(smollm2_dir))
    a, b, c = (tok(w, add_special_tokens=False).input_ids[0] for w in ("cat", " dog", " sat"))
    mask = 12345
    events = [("keep", a), ("ins", b), ("del", c), ("sub", c, b), ("keep", mask)]
    assert render_events(tok, events, mask, tty=False) == "cat[+ dog][- sat][ sat-> dog]░"
    colored = render_events(tok, events, mask, tty=True)
    assert "\x1b[32m dog" in colored and "\x1b[9m sat" in colored
    stream = io.StringIO()
    view = EditLiveView(tok, [1, 1], mask, stream=stream, tty=False)
    view(3, None, [[("keep", a), ("ins", b)], [("keep", a), ("del", c)]])
    assert stream.getvalue().splitlines() == ["[step 3][row 0] [+ dog]", "[step 3][row 1] [- sat]"]
