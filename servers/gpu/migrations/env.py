from servers.common.migrations import run_env
from servers.gpu.models import Base

run_env(Base.metadata)
