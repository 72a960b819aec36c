"""Train with LightningCLI.

    python train.py --config configs/quickstart.yaml            # fit, then test the best checkpoint
    python train.py fit --config configs/quickstart_rigl.yaml   # Lightning subcommands work too
    python train.py fit --run_name quickstart --ckpt_path last  # continue a stopped run in its folder
    python train.py test --run_name quickstart --ckpt_path best # evaluate with the run's own config.yaml
    python train.py fit --config configs/debug.yaml --print_config
    python train.py fit --config configs/quickstart.yaml --trainer.strategy=ddp --trainer.devices=2 --trainer.accelerator=cpu
"""

from lightning_sparse.cli import main

if __name__ == "__main__":
    main()
