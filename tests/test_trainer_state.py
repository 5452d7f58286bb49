import torch

from dit_distillery.trainer.state import (latest_checkpoint, list_checkpoints, load_checkpoint, prune_checkpoints,
                                          save_checkpoint)


def _trained_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
    return model, opt


def test_checkpoint_round_trip_continues_identically(tmp_path):
    model, opt = _trained_optimizer()
    trainable = dict(model.named_parameters())
    path = save_checkpoint(tmp_path, 3, trainable, opt.state_dict(), {"data_position": [0, 3], "losses": [1.0]})
    ckpt = load_checkpoint(path)
    assert ckpt["state"]["step"] == 3 and ckpt["state"]["data_position"] == [0, 3]

    model2 = torch.nn.Linear(4, 3)
    model2.load_state_dict(ckpt["trainable"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, betas=(0.9, 0.99))
    opt2.load_state_dict(ckpt["optimizer"])
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_incomplete_checkpoints_are_ignored_and_pruned(tmp_path):
    model, opt = _trained_optimizer()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, dict(model.named_parameters()), opt.state_dict(), {})
    (tmp_path / "checkpoint-0000009").mkdir()  # killed before state.json: not a checkpoint
    assert latest_checkpoint(tmp_path).name == "checkpoint-0000003"
    prune_checkpoints(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-0000002", "checkpoint-0000003"]
