import sys

from .entry import main, world_rank_from_env
from .lifeline import install

install(world_rank_from_env())      # before torch / TensorFlow start their threads
sys.exit(main())
