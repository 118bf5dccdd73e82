"""``python -m seg`` is ``seg`` (so ``torchrun -m seg run ...`` works)."""

from seg.entry import main

if __name__ == "__main__":
    main()
