"""``python -m zeroshot_kd`` (and so ``torchrun -m zeroshot_kd``) runs the ``zkd`` command line."""

from cli.main import main

if __name__ == "__main__":
    main()
