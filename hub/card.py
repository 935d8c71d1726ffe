"""The model card (README.md) of a published repo.

Built on timm's own ``generate_readme`` so the front matter (library, license, tags, datasets) and the
section order match timm's repos, with what a user of AdvProp weights must know added: how the
weights were trained, that inputs are in [-1, 1], and only measured numbers: the metrics table holds
exactly what the given evaluation JSON holds, and no paper or timm figure is quoted as if it were.
"""
import json
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

from timm.models._hub import generate_readme

from advprop_zoo.efficientnet_advprop import PAPER_ID, AdvPropVariant
from advprop_zoo.table import format_table

from hub import PublishError, __version__
from hub.eval_results import EvalResults, Metric

__all__ = ['CardInputs', 'model_card', 'merged_metrics', 'CITATIONS']

CITATIONS = (
    """@inproceedings{xie2020adversarial,
  title={Adversarial Examples Improve Image Recognition},
  author={Xie, Cihang and Tan, Mingxing and Gong, Boqing and Wang, Jiang and Yuille, Alan L. and Le, Quoc V.},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2020}
}""",
    """@inproceedings{tan2019efficientnet,
  title={EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks},
  author={Tan, Mingxing and Le, Quoc V.},
  booktitle={International Conference on Machine Learning (ICML)},
  year={2019}
}""",
    """@misc{rw2019timm,
  author = {Ross Wightman},
  title = {PyTorch Image Models},
  year = {2019},
  publisher = {GitHub},
  journal = {GitHub repository},
  doi = {10.5281/zenodo.4414861},
  howpublished = {\\url{https://github.com/huggingface/pytorch-image-models}}
}""",
)
TF_ORIGIN = 'https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet'


@dataclass
class CardInputs:
    """Everything the card states, gathered by ``stage`` from the model, the weights and the checks."""
    variant: AdvPropVariant
    model_name: str  # zoo name with tag, e.g. efficientnet_b0_advprop.ap_in1k_zoo
    architecture: str  # what config.json names (timm's tf_efficientnet_bX)
    repo_id: str
    num_classes: int
    params: int
    data_config: Mapping[str, object]
    weights_sha256: str  # of the staged model.safetensors
    source_sha256: str  # of the weights file handed in
    source_metadata: Mapping[str, str] = field(default_factory=dict)
    registered_as: Optional[str] = None  # zoo name whose pretrained cfg points at repo_id
    eval_results: Sequence[EvalResults] = ()
    max_abs_diff: float = 0.0


def _provenance(c: CardInputs) -> List[str]:
    """What the weights file says about itself (safetensors metadata written by convert/, fold or train)."""
    m = c.source_metadata
    lines = []
    if 'converter' in m:
        src = m.get('source', 'the TF release checkpoint')
        copies = {'true': 'its EMA weights, which the release evaluates', 'false': 'its raw (non-EMA) weights'}
        details = [f"scope `{m['tf_scope']}`"] if 'tf_scope' in m else []
        details += [copies[m['ema']]] if m.get('ema') in copies else []
        lines.append(f"Converted by `{m['converter']}` from the TensorFlow AdvProp release checkpoint `{src}`"
                     + (f" ({', '.join(details)})" if details else '')
                     + '; every timm tensor is filled exactly once from the checkpoint.')
        try:
            digests = json.loads(m.get('source_sha256', '{}'))
        except json.JSONDecodeError:
            digests = {}
        if isinstance(digests, dict):
            lines += [f'Source `{name}` sha256: `{digest}`' for name, digest in sorted(digests.items())]
    elif 'mode' in m:
        lines.append(f"Trained with `advprop-zoo train --mode {m['mode']}`"
                     + (f" (attacker {m['attack']})" if m.get('attack') else '')
                     + (f", advprop-zoo {m['advprop_zoo']}" if m.get('advprop_zoo') else '')
                     + '; auxiliary BNs folded away before saving.')
    elif 'advprop_zoo' in m:
        lines.append(f"advprop-zoo: {m['advprop_zoo']}.")
    return lines


def _description(c: CardInputs) -> str:
    v = c.variant
    mode = c.source_metadata.get('mode')
    if mode:  # written by advprop-zoo train: say what was run, not what the paper did
        head = '' if c.num_classes == 1000 else f' with a {c.num_classes}-class classifier'
        what = (f'An EfficientNet-B{v.level} image classification model{head}, trained with advprop-zoo\'s '
                f'`train --mode {mode}`, in timm format.')
    elif c.num_classes == 1000:
        what = (f'An EfficientNet-B{v.level} image classification model trained on ImageNet-1k with **AdvProp** '
                f'(adversarial propagation, Xie et al., CVPR 2020), in timm format.')
    else:
        what = (f'An EfficientNet-B{v.level} AdvProp model with a {c.num_classes}-class classifier, in timm format. '
                'Its body comes from an EfficientNet trained with **AdvProp** (adversarial propagation, '
                'Xie et al., CVPR 2020).')
    res = c.data_config['input_size'][-1]
    return f"""{what}

Published with advprop-zoo's `hub/publish.py` {__version__}. `config.json` names timm's own
`{c.architecture}` architecture (the same layers, keys and outputs as advprop-zoo's `{v.name}`), so plain
`timm` loads this repo; `pretrained_cfg` carries the preprocessing below.

## How AdvProp trains an EfficientNet

AdvProp treats adversarial examples as extra training data with their own statistics. Each step takes a
clean mini-batch, generates adversarial examples from it with PGD through **auxiliary BatchNorm layers**,
and minimises the clean loss (through the main BNs) plus the adversarial loss (through the auxiliary BNs)
over the shared weights. Clean and adversarial images come from different distributions, and separate BNs
stop the adversarial statistics from hurting clean accuracy. At inference the auxiliary BNs are dropped:
what is published here is an ordinary EfficientNet-B{v.level}.

The attacker is PGD under an L-inf budget in 0-255 pixel units, step size 1, eps + 1 iterations (one
for eps 1). The paper found weak attackers best for small models and strong ones for large models; the best for
B{v.level} was **{v.attacker}** (PGD, {v.attacker.steps} step{'s' if v.attacker.steps > 1 else ''}, eps {v.attacker.eps}).
The released AdvProp checkpoints were trained with TF's EfficientNet recipe (RMSProp, 350 epochs,
AutoAugment, an exponential moving average of the weights).

## Preprocessing: inputs in [-1, 1]

> **Warning.** These weights expect images scaled to **[-1, 1]** (`x * 2 / 255 - 1`), i.e. `mean = std =
> (0.5, 0.5, 0.5)`, **not** ImageNet's mean/std. ImageNet normalisation runs without any error and silently
> costs accuracy.

The config records it: {res}x{res} input, {c.data_config['interpolation']} resize, centre crop with
`crop_pct = {c.data_config['crop_pct']!r}` (TF's eval crop, `res / (res + 32)`), mean = std = 0.5.
`timm.data.resolve_model_data_config(model)` + `timm.data.create_transform(...)` build exactly that pipeline."""


def _details(c: CardInputs) -> Dict[str, object]:
    res = c.data_config['input_size'][-1]
    details: Dict[str, object] = {
        'Model Type': 'Image classification / feature backbone',
        'Model Stats': {'Params (M)': f'{c.params / 1e6:.1f}', 'Image size': f'{res} x {res}'},
        'Papers': [f'Adversarial Examples Improve Image Recognition: https://arxiv.org/abs/{PAPER_ID.split(":")[1]}',
                   'EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks: '
                   'https://arxiv.org/abs/1905.11946'],
    }
    if c.num_classes == 1000:
        details['Dataset'] = 'ImageNet-1k'
    details['Original'] = TF_ORIGIN
    details['Weights'] = _provenance(c) + [
        f'`model.safetensors` sha256: `{c.weights_sha256}`',
        f'Checked when staged: timm\'s `local-dir:` loader gives the source weights\' tensors unchanged and logits '
        f'within {c.max_abs_diff:.1e} of them',
    ]
    return details


def _usage(c: CardInputs) -> str:
    hub = f'hf-hub:{c.repo_id}'
    zoo = ''
    if c.registered_as:
        zoo = f"""
With advprop-zoo installed, the same weights are a registered model tag:

```python
import timm
import advprop_zoo  # registers efficientnet_b0_advprop ... efficientnet_b8_advprop

model = timm.create_model('{c.registered_as}', pretrained=True)
```
"""
    return f"""### Image Classification
```python
from urllib.request import urlopen
from PIL import Image
import timm

img = Image.open(urlopen(
    'https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png'
))

model = timm.create_model('{hub}', pretrained=True).eval()

# the model's own preprocessing: resize, centre crop, inputs scaled to [-1, 1] (mean = std = 0.5)
data_config = timm.data.resolve_model_data_config(model)
transforms = timm.data.create_transform(**data_config, is_training=False)

output = model(transforms(img).unsqueeze(0))  # unsqueeze single image into batch of 1
top5_probabilities, top5_class_indices = output.softmax(dim=1).topk(5)
```

### Feature Map Extraction
```python
model = timm.create_model('{hub}', pretrained=True, features_only=True).eval()
```

### Fine-tuning with a new head
```python
model = timm.create_model('{hub}', pretrained=True, num_classes=10)
```
{zoo}"""


def _source_line(r: EvalResults, c: CardInputs) -> str:
    """Where a file's numbers come from: model, dataset, weights hash, and its preprocessing if it differs."""
    parts = [f'`{r.path.name}`']
    what = ' '.join(x for x in (f'`{r.model}`' if r.model else '', f'on {r.dataset}' if r.dataset else '') if x)
    if what:
        parts.append(what)
    if r.weights_sha256 == c.weights_sha256:
        parts.append(f"weights sha256 `{r.weights_sha256}` (this repo's `model.safetensors`)")
    elif r.weights_sha256:
        parts.append(f'weights sha256 `{r.weights_sha256}` (the file this repo was staged from; '
                     '`model.safetensors` holds its tensors unchanged)')
    differ = [k for k in ('input_size', 'interpolation', 'crop_pct', 'mean', 'std')
              if k in r.data_config and k in c.data_config and not _same(r.data_config[k], c.data_config[k])]
    if differ:
        parts.append('evaluated with ' + ', '.join(f'{k} {r.data_config[k]}' for k in differ)
                     + ", not this repo's preprocessing")
    return '- ' + ', '.join(parts)


def _same(a: object, b: object) -> bool:
    norm = (lambda v: tuple(v) if isinstance(v, (list, tuple)) else v)
    return norm(a) == norm(b)


def merged_metrics(results: Sequence[EvalResults]) -> List[Metric]:
    """All files' metrics in order; one number per (dataset, metric), so two files cannot disagree on a card."""
    out: Dict[tuple, Metric] = {}
    where: Dict[tuple, EvalResults] = {}
    for r in results:
        for m in r.metrics:
            key = (m.dataset, m.name)
            if key in out and out[key].value != m.value:
                raise PublishError(f'{where[key].path} and {r.path} both report {m.dataset} {m.name} '
                                   f'({out[key].value} and {m.value}); pass one of them')
            out.setdefault(key, m)
            where.setdefault(key, r)
    return list(out.values())


def _evaluation(c: CardInputs) -> str:
    if not c.eval_results:
        return ('\n## Evaluation\n\nNo evaluation results were published with these weights. Measure them with '
                f'`advprop-zoo eval --model {c.variant.name} --checkpoint model.safetensors --data-dir IMAGENET_VAL '
                '--output results.json` '
                'and publish again with `--eval results.json`.\n')
    metrics = merged_metrics(c.eval_results)
    units = ('Accuracies and errors are percentages, CE and mCE are normalised by AlexNet\'s errors, and eps is in '
             '0-255 pixel units.'
             if all(r.schema for r in c.eval_results) else 'Values are in the units of the file they come from.')
    text = ('\n## Evaluation\n\nEvery number below is copied, as written, from these evaluation results; nothing '
            f'else is reported. {units}\n\n' + '\n'.join(_source_line(r, c) for r in c.eval_results) + '\n\n')
    main = [[m.dataset, m.name, str(m.value)] for m in metrics if not m.per_corruption]  # str: no rounding
    if main:
        text += format_table(['dataset', 'metric', 'value'], main, align='llr') + '\n'
    per = [m for m in metrics if m.per_corruption]
    if per:
        text += ('\nImageNet-C by corruption (mean error over the severities, and CE: error relative to '
                 'AlexNet\'s):\n\n' + format_table(['metric', 'value'], [[m.name, str(m.value)] for m in per],
                                                    align='lr') + '\n')
    return text


def model_card(c: CardInputs) -> str:
    """The README.md text: timm's front matter and sections, AdvProp's facts, measured metrics only."""
    card = {
        'tags': ['image-classification', 'timm', 'efficientnet', 'advprop', 'adversarial-training'],
        'license': 'apache-2.0',
        'description': _description(c),
        'details': _details(c),
        'usage': _usage(c),
        'citation': list(CITATIONS),
    }
    text = generate_readme(card, c.repo_id.split('/')[-1])
    head, sep, tail = text.partition('\n## Citation\n')
    if not sep:  # timm always writes the citations last; keep the card whole if that ever changes
        head, tail = text, ''
    license_ = ('\n## License\n\nApache-2.0, like the TensorFlow EfficientNet release these weights come from '
                'and timm.\n')
    return head + _evaluation(c) + (sep + tail if sep else '') + license_
