import sys

if sys.argv[1:2] in (["submit"], ["jobs"]):  # Slurm submission: launch.slurm owns these options (imported lazily)
    from launch import slurm

    sys.exit(slurm.main(sys.argv[1:]))

from launch.cli import main

sys.exit(main())
