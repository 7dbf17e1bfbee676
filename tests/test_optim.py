import torch
from torch import nn

from fastadalora import AdaLoraLinear, create_loraplus_optimizer


def _model():
    torch.manual_seed(0)
    return nn.Sequential(AdaLoraLinear(nn.Linear(8, 8), r=4), nn.LayerNorm(8), nn.Linear(8, 2))


def test_loraplus_groups_and_learning_rates():
    model = _model()
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    by_lr = {}
    for group in opt.param_groups:
        for p in group["params"]:
            by_lr[id(p)] = (group["lr"], group["weight_decay"])
    layer = model[0]
    assert by_lr[id(layer.lora_A)] == (1e-3, 0.0) and by_lr[id(layer.lora_E)] == (1e-3, 0.0)
    assert by_lr[id(layer.lora_B)] == (16e-3, 0.0)
    assert by_lr[id(model[1].weight)] == (16e-3, 0.0)  # 1-D LayerNorm weight: B's lr, no decay
    assert id(layer.base_layer.weight) not in by_lr  # frozen


def test_loraplus_honours_weight_decay_unlike_peft():
    model = _model()
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4, weight_decay=0.1)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model[0].lora_A)] == 0.1 and decays[id(model[0].lora_B)] == 0.1
    assert decays[id(model[2].bias)] == 0.0
