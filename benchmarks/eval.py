"""Clean-eval throughput: ``advprop-zoo eval``'s path against timm's own validation loop, same model, same data.

    python benchmarks/eval.py [--quick] [--device cuda] [--amp bf16] [--images 256] [--workers 2] [--threads 1]

The data is a synthetic ImageNet-style folder (wnid class folders of JPEGs at about the size of
ImageNet val images) built in a temp dir, so no dataset is needed; the weights are random (throughput
does not depend on them) and written to a safetensors file that both paths load.

Rows (images per second over the evaluation loop, median of interleaved rounds):

* timm validate.py loop (anchor): timm's ``create_dataset`` + ``create_loader`` (prefetcher on CUDA)
  from ``resolve_data_config``, model in eval mode, one warmup batch, ``torch.inference_mode``, loss
  and ``timm.utils.accuracy`` with ``.item()`` per batch: validate.py's loop, without its logging;
* advprop-zoo eval: ``run_eval`` as the command runs it (BNs fused, static 'same' padding in the kernel);
* advprop-zoo eval --no-fuse: the same loop on the model as built (how much the fusion gives);
* advprop-zoo eval --channels-last.

``run_eval``'s own throughput excludes building the model (load, fuse), which it times separately;
its end-to-end wall time per run is printed too. Target (issue 7): >= 1.0x the anchor.
The PGD robust-eval comparison against torchattacks is benchmarks/attack.py.
"""
import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import advprop_zoo  # noqa: E402,F401
from advprop_zoo.eval.datasets import imagenet_synsets  # noqa: E402
from advprop_zoo.eval.suite import AMP_DTYPES, EvalConfig, run_eval  # noqa: E402
from advprop_zoo.table import format_table  # noqa: E402


def make_folder(root: Path, images: int, classes: int, seed: int = 0) -> Path:
    """ImageNet-val-like folder: smooth random images of 400-500 px sides (JPEG decode + bicubic resize
    cost like the real thing), spread over the first ``classes`` wnids."""
    rng = np.random.default_rng(seed)
    wnids = imagenet_synsets()[:classes]
    for i in range(images):
        h, w = rng.integers(400, 500, size=2)
        low = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((int(w), int(h)), Image.BILINEAR)
        folder = root / wnids[i % classes]
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f'ILSVRC2012_val_{i:08d}.JPEG', quality=90)
    return root


def timm_validate_loop(model_name: str, checkpoint: Path, root: Path, batch_size: int, workers: int,
                       device: torch.device, amp: str, img_size: int) -> float:
    """validate.py's loop (timm 1.0): returns images per second over the loop."""
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.models import load_checkpoint
    from timm.utils import AverageMeter, accuracy
    model = timm.create_model(model_name)
    load_checkpoint(model, str(checkpoint))
    data_config = resolve_data_config({'img_size': img_size} if img_size else {}, model=model)
    model = model.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    dataset = create_dataset(root=str(root), name='', split='validation')
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=batch_size, use_prefetcher=device.type == 'cuda',
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        num_workers=workers, crop_pct=data_config['crop_pct'], crop_mode=data_config['crop_mode'],
        pin_memory=device.type == 'cuda', device=device)
    amp_autocast = (lambda: torch.autocast(device.type, dtype=AMP_DTYPES[amp])) if amp else nullcontext
    top1, top5, losses = AverageMeter(), AverageMeter(), AverageMeter()
    model.eval()
    with torch.inference_mode():
        with amp_autocast():
            model(torch.randn((batch_size,) + tuple(data_config['input_size'])).to(device))
        n = 0
        start = time.perf_counter()
        for input, target in loader:
            if device.type != 'cuda':
                input, target = input.to(device), target.to(device)
            with amp_autocast():
                output = model(input)
                loss = criterion(output, target)
            acc1, acc5 = accuracy(output.detach(), target, topk=(1, 5))
            losses.update(loss.item(), output.shape[0])
            top1.update(acc1.item(), output.shape[0])
            top5.update(acc5.item(), output.shape[0])
            n += output.shape[0]
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return n / (time.perf_counter() - start), top1.avg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='efficientnet_b0_advprop')
    p.add_argument('--images', type=int, default=256)
    p.add_argument('--classes', type=int, default=16)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--img-size', type=int, default=None, help='default: the model\'s own (224 for B0)')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', choices=['bf16', 'fp16'], default=None)
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch\'s own)')
    p.add_argument('--quick', action='store_true', help='96 images, 2 rounds')
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.images, args.rounds = 96, 2
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix='advprop-zoo-eval-bench-') as tmp:
        tmp = Path(tmp)
        root = make_folder(tmp / 'val', args.images, args.classes)
        ckpt = tmp / 'weights.safetensors'
        save_file(timm.create_model(args.model).state_dict(), str(ckpt))

        def ours(**kw):
            cfg = EvalConfig(model=args.model, data_dir=str(root), checkpoint=str(ckpt), batch_size=args.batch_size,
                             workers=args.workers, device=args.device, amp=args.amp, img_size=args.img_size,
                             progress=False, **kw)
            t0 = time.perf_counter()
            report = run_eval(cfg)
            return report['results']['clean']['images_per_s'], report['metrics']['imagenet_top1'], \
                time.perf_counter() - t0

        runs = {
            'timm validate.py loop (anchor)': lambda: timm_validate_loop(
                args.model, ckpt, root, args.batch_size, args.workers, device, args.amp, args.img_size) + (None,),
            'advprop-zoo eval (fused)': lambda: ours(),
            'advprop-zoo eval --no-fuse': lambda: ours(fuse=False),
            'advprop-zoo eval --channels-last': lambda: ours(channels_last=True),
        }
        rates = {k: [] for k in runs}
        walls = {k: [] for k in runs}
        top1 = {}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                rate, acc, wall = fn()
                rates[name].append(rate)
                top1[name] = acc
                if wall is not None:
                    walls[name].append(wall)
    anchor = statistics.median(rates['timm validate.py loop (anchor)'])
    rows = [[name, f'{statistics.median(r):.1f}', f'{statistics.median(r) / anchor:.2f}x',
             f'{statistics.median(walls[name]):.1f}' if walls[name] else '-', f'{top1[name]:.2f}']
            for name, r in rates.items()]
    size = args.img_size or timm.create_model(args.model, pretrained=False).pretrained_cfg['input_size'][-1]
    print(f'{args.model} {size}px, {args.images} JPEGs (400-500 px), batch {args.batch_size}, {args.workers} workers, '
          f'{args.device}{" " + args.amp if args.amp else ""}, torch {torch.__version__}, timm {timm.__version__}, '
          f'{torch.get_num_threads()} threads; median of {args.rounds} interleaved rounds')
    print(format_table(['path', 'images/s', 'vs anchor', 'run_eval wall s', 'top-1'], rows, align='lrrrr'))
    print('\ntop-1: random weights on arbitrary labels, ~0 everywhere; that the paths compute the same function '
          'is tested in tests/test_eval.py.')


if __name__ == '__main__':
    main()
