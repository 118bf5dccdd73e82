"""Print the README's first ```bash block (the command a newcomer pastes), for .ci/run to execute as is."""

import re
import sys
from pathlib import Path

blocks = re.findall(r"```bash\n(.*?)```", Path(sys.argv[1] if len(sys.argv) > 1 else "README.md").read_text(), re.S)
print(blocks[0].strip())
