"""The flags and the body of ``advprop-zoo eval``, kept here so cli.py stays a list of thin subcommands.

The flags a timm user knows from timm's ``validate.py`` are spelled and mean what they do there (``-m``,
``-b``, ``-j``, ``--crop-pct``, ``--interpolation``, ``--mean``, ``--std``, ``--use-ema``, ``--results-file``,
``--split``, ``--class-map``, timm dataset specs in ``--dataset``, ...); where one differs on purpose its help
says so in a line.
"""
import argparse
from pathlib import Path

import torch

from ..attacks import PAPER_STEPS_RULE
from ..malloc import keep_freed_memory
from ..weights import check_output_path
from .datasets import DATASETS, TIMM_PREFIXES, check_dataset_name
from .autoattack import AUTOATTACK_ATTACKS, INSTALL_HINT as AA_INSTALL_HINT
from .results import (
    check_plotting, compare_results, plotting_available, format_results, plot_results, read_results, write_results, write_results_csv,
)
from .suite import CROP_MODES, INTERPOLATIONS, EvalConfig, parse_attacks, parse_eps, run_eval

__all__ = ['add_eval_arguments', 'eval_command']

_BARE_AMP = 'timm'  # --amp without a dtype: timm's flag, its dtype from --amp-dtype (default float16)
_AMP_DTYPE = {'float16': 'fp16', 'bfloat16': 'bf16'}

DESCRIPTION = (
    'Evaluate a model the way the AdvProp paper did: ImageNet top-1/top-5, robust accuracy under a PGD/FGSM '
    'sweep over eps (0-255 pixel units) and under AutoAttack (the pyautoattack package; --protocol robustbench: '
    'RobustBench\'s ImageNet L-inf setting), a dual-BN checkpoint through its auxiliary BNs too (--bn-route), '
    'ImageNet-C per-corruption error, CE, mCE and relative mCE (AlexNet-'
    'normalised), ImageNet-A top-1 (logits cut to its 200 classes), Stylized-ImageNet top-1, or any ImageFolder. '
    'Preprocessing comes from the model\'s pretrained config through timm (size, bicubic, crop_pct, mean/std). '
    'An image that cannot be read (a truncated file, a non-image under an image name) is left out of every number '
    'and named: an excluded column and a line in the tables, "excluded" lists in the JSON. '
    'Prints Markdown tables; --output writes every number as JSON (written atomically). '
    '--compare A.json B.json prints two or more results side by side with deltas against the first. '
    'timm validate.py\'s flags are accepted with timm\'s meaning (-m, -b, -j, --crop-pct, --interpolation, '
    '--mean, --std, --use-ema, --results-file CSV, --split, --class-map, hfds/wds/tfds/torch dataset specs); '
    'where ours differs on purpose, the flag\'s help says so.')


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The ``eval`` subcommand's flags."""
    p.add_argument('-m', '--model', metavar='NAME',
                   help='timm model name, e.g. efficientnet_b0_advprop (a .tag picks pretrained weights)')
    w = p.add_mutually_exclusive_group()
    w.add_argument('--pretrained', action='store_true',
                   help="timm's pretrained weights (Hub cache; HF_HUB_OFFLINE works). Differs from timm: one of "
                        '--pretrained / --checkpoint is required (validate.py falls back to pretrained weights)')
    w.add_argument('--checkpoint', metavar='FILE', help='weights file (.safetensors, or .pth / .bin / a timm train.py '
                   '.pth.tar loaded weights_only: tensors, plain values and its argparse args only; dual-BN '
                   'checkpoints are folded unless --bn-route aux|both); its classifier size is used')
    p.add_argument('--use-ema', action='store_true',
                   help="the EMA weights of a timm --checkpoint (state_dict_ema; default: its state_dict, as timm). "
                        'Differs from timm: a file without EMA weights is an error, not a silent fall back')
    p.add_argument('--num-classes', type=int, default=None, help='classifier size of --checkpoint, if not read from it')
    p.add_argument('--data-dir', metavar='DIR', help='dataset folder (class folders, or a folder holding val/); for '
                   'imagenet-c the folder of corruption folders; for a timm spec timm\'s root (hfds/, hfids/, '
                   'tfds/: optional cache / data dir; wds/: the shards; torch/: its root)')
    p.add_argument('--dataset', metavar='NAME', default='imagenet',
                   help=f'layout and label space of --data-dir: {", ".join(DATASETS)} (default imagenet; folder: any '
                        'ImageFolder whose class count equals the model\'s, timm\'s default ""), or a timm dataset '
                        f'spec {", ".join(p + "/NAME" for p in TIMM_PREFIXES)} read through timm.data.create_dataset: '
                        'labelled by its own classes (or --class-map) like folder, the model\'s class count must '
                        'match, and its metrics are named folder_top1 / folder_top5. '
                        'Differs from timm: the default is imagenet (WordNet-id labels), not a sorted ImageFolder; '
                        'a .tar --data-dir is not read')
    d = p.add_argument_group('timm dataset options (validate.py\'s)')
    d.add_argument('--split', metavar='NAME', default=None,
                   help='dataset split (timm specs: default validation, as timm). Folder layouts: the subfolder to '
                        'use (any of timm\'s synonyms: validation finds val/); differs from timm: a missing one is '
                        'an error, and without --split a folder holding only val/ (and train/) is searched')
    d.add_argument('--class-map', metavar='FILE', default=None,
                   help='class name -> label file as timm reads it (.txt: one name per line; .pkl) for folder and '
                        'timm specs; the benchmark layouts keep their WordNet-id labels')
    d.add_argument('--input-img-mode', metavar='MODE', default=None,
                   help='PIL mode images are converted to (default RGB, as timm for a 3-channel model)')
    d.add_argument('--input-key', default=None, help='image field of hfds/ hfids/ wds/ tfds/ samples (timm\'s default)')
    d.add_argument('--target-key', default=None,
                   help='label field of hfds/ hfids/ wds/ tfds/ samples (timm\'s default)')
    d.add_argument('--dataset-download', action='store_true',
                   help='let torch/ and tfds/ (hfids/) sets download themselves, as timm')
    d.add_argument('--num-samples', type=int, metavar='N', default=None,
                   help='evaluate the first N images in the dataset\'s order, for the clean pass and every attack '
                        '(RobustBench\'s n_ex; --protocol robustbench: the first N of its list); for an iterable '
                        'set (hfids/, wds/, tfds/) the length of the split, as timm')
    pre = p.add_argument_group('preprocessing (default: the model\'s pretrained config, via timm\'s '
                               'resolve_data_config; these override it as in validate.py)')
    pre.add_argument('--img-size', type=int, default=None, metavar='N',
                     help='evaluate at this size instead of the model\'s own')
    pre.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                     help='C H W instead of the model\'s own input size')
    pre.add_argument('--crop-pct', type=float, default=None, metavar='PCT', help='center-crop fraction, in (0, 1]')
    pre.add_argument('--crop-mode', choices=CROP_MODES, default=None, help='timm crop mode')
    pre.add_argument('--interpolation', choices=INTERPOLATIONS, default=None, help='resize interpolation')
    pre.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                     help='normalisation mean, 1 value or one per channel (0-1 pixel units; AdvProp models: 0.5)')
    pre.add_argument('--std', type=float, nargs='+', default=None, metavar='STD',
                     help='normalisation std, 1 value or one per channel (AdvProp models: 0.5)')
    a = p.add_argument_group('robust accuracy')
    a.add_argument('--attack', metavar='KIND', default=None,
                   help='also evaluate under these L-inf attacks: pgd, fgsm, autoattack, or several comma-separated '
                        '(pgd,autoattack: both curves in one --plot). autoattack runs AutoAttack from the pyautoattack '
                        f'package ({AA_INSTALL_HINT}) on images in [0, 1], the model\'s mean/std inside the model')
    a.add_argument('--eps', default=None, help='comma-separated eps in 0-255 pixel units, 4 = 4/255 (default 1,2,4; '
                   'autoattack alone: 4). AutoAttack takes eps in (0, 255]')
    a.add_argument('--autoattack-version', default='standard', metavar='VERSION',
                   help='AutoAttack version: standard (APGD-CE, APGD-T, FAB-T, Square; default), plus, rand, or custom '
                        'with --autoattack-attacks')
    a.add_argument('--autoattack-attacks', default=None, metavar='LIST',
                   help='with --autoattack-version custom: the attacks to run, comma-separated, in AutoAttack\'s '
                        f'names ({", ".join(AUTOATTACK_ATTACKS)})')
    a.add_argument('--protocol', default=None, metavar='NAME',
                   help='robustbench: RobustBench\'s ImageNet L-inf setting on the ImageNet val folder --data-dir: its '
                        'fixed 5000-image list, resize 256 / center-crop 224 (bilinear), standard AutoAttack at eps '
                        '4/255 (fixes --attack, --eps and the preprocessing). The list comes from the robustbench '
                        'package (pip install --no-deps robustbench) or --robustbench-list')
    a.add_argument('--robustbench-list', default=None, metavar='FILE',
                   help='the image list for --protocol robustbench (lines like n09468604/ILSVRC2012_val_00015253.JPEG) '
                        'instead of the installed robustbench package\'s')
    a.add_argument('--bn-route', default='main', metavar='ROUTE',
                   help='a dual-BN checkpoint (AdvProp training\'s weights before folding) through its main BNs '
                        '(default; the released model), its auxiliary BNs (aux: every metric prefixed aux_, e.g. '
                        'aux_imagenet_top1) or both (two rows per number). A plain checkpoint has no aux route')
    a.add_argument('--steps', type=int, default=None,
                   help=f'PGD iterations (default: the paper\'s rule, {PAPER_STEPS_RULE})')
    a.add_argument('--step-size', type=float, default=None, help='PGD step in pixel units (default 1; FGSM: eps)')
    a.add_argument('--targeted', action='store_true', help='target a random wrong label (AdvProp\'s training attack) '
                   'instead of the default untargeted attack')
    c = p.add_argument_group('imagenet-c')
    c.add_argument('--corruptions', default=None, help='comma-separated subset of corruptions (mCE needs all 15)')
    c.add_argument('--clean-dir', metavar='DIR', default=None,
                   help='ImageNet val folder: also measure the clean error, for relative mCE')
    r = p.add_argument_group('run')
    r.add_argument('-b', '--batch-size', type=int, default=64, metavar='N',
                   help='default 64 (differs from timm\'s 256: fits a CPU and the attacks\' memory)')
    r.add_argument('--amp', nargs='?', const=_BARE_AMP, metavar='{bf16,fp16}', default=None,
                   help='autocast dtype (default: float32); a bare --amp is float16, as timm')
    r.add_argument('--amp-dtype', choices=['float16', 'bfloat16'], default=None,
                   help='timm\'s spelling of the --amp dtype (needs --amp)')
    r.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    r.add_argument('--no-fuse', action='store_true', help='evaluate the model as built, without folding BNs into convs '
                   '(fusion computes the same function up to float rounding, faster)')
    r.add_argument('--device', default=None, help='cpu, cuda, cuda:1 ... (default: cuda if available)')
    r.add_argument('-j', '--workers', type=int, default=4, metavar='N',
                   help='data loader worker processes (default 4)')
    r.add_argument('--cpu-malloc', default='reuse', choices=('reuse', 'default'),
                   help="on CPU, 'reuse' (default) keeps freed activation memory in the process instead of "
                        "page-faulting it in again every batch (glibc; advprop_zoo.malloc)")
    r.add_argument('--seed', type=int, default=0, help='seed of attack random starts and targets (default 0; '
                   'differs from timm\'s 42, which seeds nothing an eval without attacks depends on)')
    r.add_argument('--no-progress', action='store_true', help='no progress bar')
    o = p.add_argument_group('output')
    o.add_argument('--output', metavar='JSON', default=None, help='write the results here (atomically)')
    o.add_argument('--results-file', metavar='FILE', default=None,
                   help='also write the results as timm validate.py\'s CSV (model, top1, top1_err, top5, top5_err, '
                        'param_count, img_size, crop_pct, interpolation; attack / mCE columns after top5_err), '
                        'atomically. Differs from timm: CSV only (no --results-format; --output is the JSON)')
    o.add_argument('--plot', metavar='PNG', default=None, help='accuracy-vs-eps plot (--attack: PGD / FGSM and '
                   'AutoAttack curves, eps 0 = clean) or CE bar chart (imagenet-c); needs matplotlib. Default with '
                   '--output: beside the JSON (results.json -> results.png) when matplotlib is installed')
    o.add_argument('--compare', nargs='+', metavar='JSON', default=None,
                   help='compare results files instead of evaluating: A.json B.json [...], deltas against A')


def eval_command(args: argparse.Namespace) -> int:
    """Run ``advprop-zoo eval``: compare results files, or evaluate and print / write the results."""
    if args.compare:
        if len(args.compare) < 2:
            raise ValueError('--compare needs two or more results files')
        reports = [read_results(p) for p in args.compare]
        labels = [Path(p).stem for p in args.compare]
        if len(set(labels)) < len(labels):
            labels = list(args.compare)
        print(compare_results(reports, labels))
        return 0
    if not args.model:
        raise ValueError('--model is required (or --compare A.json B.json)')
    check_dataset_name(args.dataset)
    if args.protocol and (args.attack or args.eps or args.autoattack_version != 'standard'
                          or args.autoattack_attacks):
        raise ValueError('--protocol robustbench fixes the attack (standard AutoAttack, eps 4/255); drop --attack, '
                         '--eps, --autoattack-version and --autoattack-attacks')
    if args.robustbench_list and args.protocol != 'robustbench':
        raise ValueError('--robustbench-list needs --protocol robustbench')
    kinds = parse_attacks(args.attack)
    if not kinds and (args.eps or args.steps or args.step_size or args.targeted):
        raise ValueError('--eps, --steps, --step-size and --targeted need --attack pgd|fgsm|autoattack')
    if kinds == ['autoattack'] and (args.steps or args.step_size or args.targeted):
        raise ValueError('--steps, --step-size and --targeted are PGD / FGSM settings; AutoAttack fixes its own')
    if (args.autoattack_version != 'standard' or args.autoattack_attacks) and 'autoattack' not in kinds:
        raise ValueError('--autoattack-version and --autoattack-attacks need --attack autoattack')
    amp = args.amp
    wanted = _AMP_DTYPE.get(args.amp_dtype or 'float16')
    if amp == _BARE_AMP:  # timm's --amp [--amp-dtype float16|bfloat16]
        amp = wanted
    elif args.amp_dtype and amp is None:
        raise ValueError('--amp-dtype needs --amp (as in timm, it is the dtype of mixed precision)')
    elif args.amp_dtype and amp != wanted:
        raise ValueError(f'--amp {amp} and --amp-dtype {args.amp_dtype} disagree')
    plottable = bool(kinds or args.protocol or args.dataset == 'imagenet-c')
    if args.output and not args.plot and plottable and plotting_available():
        args.plot = str(Path(args.output).with_suffix('.png'))  # the curves beside the JSON
    outputs = [o for o in (args.output, args.results_file, args.plot) if o]
    if len({str(Path(o).resolve()) for o in outputs}) < len(outputs):
        raise ValueError('--output, --results-file and --plot must name different files')
    if args.output:
        check_output_path(args.output, overwrite=True)
    if args.results_file:
        check_output_path(args.results_file, overwrite=True)
    if args.plot:
        check_output_path(args.plot, overwrite=True)
        if not plottable:
            raise ValueError('--plot needs --attack (accuracy vs eps) or --dataset imagenet-c (CE bar chart)')
        check_plotting()

    cfg = EvalConfig(
        model=args.model, data_dir=args.data_dir, dataset=args.dataset, checkpoint=args.checkpoint,
        pretrained=args.pretrained, num_classes=args.num_classes, attack=args.attack,
        eps=parse_eps(args.eps or ('4' if kinds == ['autoattack'] else '1,2,4')) if kinds else (), steps=args.steps, step_size=args.step_size,
        targeted=args.targeted, batch_size=args.batch_size, amp=amp, channels_last=args.channels_last,
        device=args.device, workers=args.workers, fuse=not args.no_fuse, img_size=args.img_size,
        corruptions=[c.strip() for c in args.corruptions.split(',') if c.strip()] if args.corruptions else None,
        clean_dir=args.clean_dir, seed=args.seed, progress=not args.no_progress, use_ema=args.use_ema,
        split=args.split, class_map=args.class_map, input_img_mode=args.input_img_mode,
        dataset_download=args.dataset_download, num_samples=args.num_samples, input_key=args.input_key,
        target_key=args.target_key, input_size=args.input_size, crop_pct=args.crop_pct, crop_mode=args.crop_mode,
        interpolation=args.interpolation, mean=args.mean, std=args.std,
        autoattack_version=args.autoattack_version,
        autoattack_attacks=([a.strip() for a in args.autoattack_attacks.split(',') if a.strip()]
                            if args.autoattack_attacks else None),
        protocol=args.protocol, robustbench_list=args.robustbench_list,
        bn_route=args.bn_route)
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if args.cpu_malloc == 'reuse' and device == 'cpu':
        keep_freed_memory()  # fresh activations every batch: most of a CPU forward would be page faults
    report = run_eval(cfg)
    print(format_results(report))
    if args.output:
        write_results(report, args.output)
        print(f'\nresults: {args.output}')
    if args.results_file:
        write_results_csv(report, args.results_file)
        print(f'results (timm CSV): {args.results_file}')
    if args.plot:
        plot_results(report, args.plot)
        print(f'plot: {args.plot}')
    return 0
