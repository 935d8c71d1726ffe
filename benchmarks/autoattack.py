"""AutoAttack through ``advprop-zoo eval`` against the pyautoattack package's own call: same model, same images.

    python benchmarks/autoattack.py [--quick] [--eps 2] [--threads 1] [--device cuda]

The anchor is what a user writes: pyautoattack's ``AutoAttack(model, version='standard', eps=eps/255, seed=0)
.run_standard_evaluation(x, y, batch_size=B)`` on the timm model as built, behind a module that applies its
mean/std to [0, 1] images. Measured: ``run_eval`` (the library function of ``advprop-zoo eval``) with
``attack='autoattack'`` on an image folder of the same images (written as PNG, so they read back to the same
pixels), labelled by the model's own predictions so every image is attacked; its time is the AutoAttack part
of the run (the report's ``seconds``: clean pass and attacks; data loading and the other passes excluded,
as they are from the anchor). Both: standard version, the same eps, seed, batch size, images and labels.
Two eval rows: the default (BNs fused into the convs, as ``advprop-zoo eval`` runs) and ``--no-fuse`` (the
model exactly as the anchor's, so every image's outcome must agree bit for bit). Prints each path's seconds,
robust accuracy, how many images' outcomes differ from the anchor's, and the speed ratio anchor / path (goal:
>= 1.0x with the same robust accuracy). Repetitions interleave; medians are reported. Exit status 1 when a
path's robust accuracy differs from the anchor's.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm  # noqa: E402
from timm.utils.misc import natural_key  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import advprop_zoo  # noqa: E402,F401
from advprop_zoo.eval.autoattack import require_autoattack  # noqa: E402
from advprop_zoo.eval.datasets import imagenet_synsets  # noqa: E402
from advprop_zoo.eval.suite import EvalConfig, run_eval  # noqa: E402
from advprop_zoo.table import format_table  # noqa: E402
from benchmarks.cpu_setup import add_cpu_args, apply_cpu_args, cpu_time_is_the_clock  # noqa: E402


class Normalized(torch.nn.Module):
    """The anchor's model: [0, 1] images normalised with the model's mean/std, then the timm model as built."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer('mean', torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer('std', torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


def _model(name: str, seed: int = 0):
    """``name`` with random weights given BN statistics and a head that make its predictions depend on the input."""
    torch.manual_seed(seed)
    model = timm.create_model(name).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        model.get_classifier().weight.mul_(50)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default=None, help='timm model (default efficientnet_b0_advprop; --quick: '
                   'test_efficientnet)')
    p.add_argument('--res', type=int, default=64, help='image side in pixels (default 64)')
    p.add_argument('--images', type=int, default=32)
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--eps', type=float, default=0.5, help='L-inf eps in 0-255 pixel units (default 0.5: some images '
                   'survive APGD-CE, so every attack of the ensemble runs)')
    p.add_argument('--rounds', type=int, default=1)
    p.add_argument('--device', default='cpu')
    p.add_argument('--quick', action='store_true', help='16 images of 32 px, timm\'s test_efficientnet (B0 takes '
                   'over 15 minutes on 2 cores: the standard ensemble is thousands of passes)')
    add_cpu_args(p)
    args = p.parse_args()
    if args.quick:
        args.images, args.res, args.batch = 16, 32, 16
    args.model = args.model or ('test_efficientnet' if args.quick else 'efficientnet_b0_advprop')
    cpu_setup = apply_cpu_args(args)
    aa = require_autoattack()
    device = torch.device(args.device)
    model = _model(args.model)
    mean, std = model.pretrained_cfg['mean'], model.pretrained_cfg['std']
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (args.images, args.res, args.res, 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().float().div(255)
    anchor_model = Normalized(model, mean, std).to(device).eval()
    with torch.no_grad():
        y = torch.cat([anchor_model(x[i:i + args.batch].to(device)).argmax(-1).cpu()
                       for i in range(0, len(x), args.batch)])

    wnids = imagenet_synsets()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / 'model.safetensors'
        save_file(model.state_dict(), str(ckpt))
        root = Path(tmp) / 'val'
        for i, (img, label) in enumerate(zip(pixels, y.tolist())):
            (root / wnids[label]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / wnids[label] / f'{i:05d}.png')
        # the anchor gets the images in the folder's order (timm's reader: sorted paths), as eval reads them
        names = [f'{wnids[label]}/{i:05d}.png' for i, label in enumerate(y.tolist())]
        order = sorted(range(len(x)), key=lambda i: natural_key(names[i]))
        x_anchor, y_anchor, names = x[order], y[order], [names[i] for i in order]
        cfg = dict(model=args.model, data_dir=str(root), checkpoint=str(ckpt), attack='autoattack',
                   eps=[args.eps], batch_size=args.batch, device=args.device, workers=0, progress=False,
                   img_size=args.res, crop_pct=1.0, interpolation='bicubic', seed=0)

        clock = time.process_time if cpu_time_is_the_clock(device) else time.perf_counter

        def anchor():
            adversary = aa.AutoAttack(anchor_model, device=device, eps=args.eps / 255, norm='Linf', seed=0,
                                      version='standard')
            t0 = clock()
            _, y_adv = adversary.run_standard_evaluation(x_anchor.clone(), y_anchor.clone(), batch_size=args.batch)
            if device.type == 'cuda':
                torch.cuda.synchronize()
            return clock() - t0, (y_adv.cpu() == y_anchor).nonzero().flatten().tolist()

        def ours(fuse: bool):
            report = run_eval(EvalConfig(fuse=fuse, **cfg))
            r = report['results']['autoattack'][0]
            files = report['results']['autoattack_images']
            assert files == names, 'eval read the images in another order'
            return r['seconds'], r['robust'], r['attacks']

        paths = {'anchor': anchor, 'fused': lambda: ours(True), 'unfused': lambda: ours(False)}
        times = {k: [] for k in paths}
        robust, attacks = {}, {}
        for _ in range(args.rounds):
            for name, fn in paths.items():
                t, robust[name], *extra = fn()
                times[name].append(t)
                if extra:
                    attacks[name] = extra[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(x)
    print(f'AutoAttack standard, {args.model} at {args.res} px, {n} images, batch {args.batch}, eps {args.eps:g}/255, '
          f'{args.device}, {cpu_setup}, pyautoattack {aa.__version__}, median of {args.rounds} round(s)')
    after = ', '.join(f"{r['name']} {r['top1']:.2f}% ({r['seconds']:.1f} s)" for r in attacks['fused'])
    print(f'eval (fused): robust accuracy after each attack: {after}')
    labels = {'anchor': 'pyautoattack run_standard_evaluation (anchor)',
              'fused': 'advprop-zoo eval --attack autoattack (BNs fused)',
              'unfused': 'advprop-zoo eval --attack autoattack --no-fuse'}
    anchor_set = set(robust['anchor'])
    rows = [[labels[k], f'{med[k]:.1f}', f'{100 * len(robust[k]) / n:.2f}',
             len(anchor_set ^ set(robust[k])), f'{med["anchor"] / med[k]:.2f}×'] for k in paths]
    print(format_table(['path', 'seconds', 'robust top-1 %', 'images differing', 'speed'], rows, align='lrrrr'))
    if any(len(robust[k]) != len(robust['anchor']) for k in paths):
        sys.exit(1)


if __name__ == '__main__':
    main()
