"""Publishing AdvProp EfficientNets to the Hugging Face Hub, laid out the way timm's own repos are.

A folder of scripts beside the installed package: ``advprop_zoo`` never imports it, and it is not
installed; ``python hub/publish.py --help`` is the entry point. The modules:

- ``stage``        weights -> a checked repo folder (timm's ``save_for_hf``: config.json + model.safetensors,
                   plus the card), written beside its target and renamed into place, then reloaded through
                   timm's ``local-dir:`` loader and compared logit for logit with the source weights
- ``card``         the model card (README.md), built on timm's ``generate_readme``
- ``eval_results`` the documented subset of an ``advprop-zoo eval --output`` JSON that the card reports
- ``upload``       repo-id and token checks, ``create_repo`` + one ``upload_folder`` commit
- ``publish``      the command line: one weights file, or a folder of converted B0-B8 files
"""

from advprop_zoo.errors import AdvPropZooError

__version__ = '1.0.0'  # recorded in every card; bump when staged folders would change


class PublishError(AdvPropZooError, RuntimeError):
    """An input or step that stops a publish, with the reason in one line."""
