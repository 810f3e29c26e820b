"""``python -m e5v.train`` (and ``torchrun ... -m e5v.train``, ``deepspeed --module e5v.train``): e5v-train."""

from e5v.train.cli import main

if __name__ == "__main__":
    main()
