from servers.common.migrations import run_env
from servers.inference.models import Base

run_env(Base.metadata)
