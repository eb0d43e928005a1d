"""``python -m cli`` (and ``torchrun ... -m cli pretrain ...``) runs the ``simsiam`` command."""

from .main import main

main()
