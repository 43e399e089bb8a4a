"""Ray job entry point for `emotr run`, e.g.

ray job submit --address http://HEAD:8265 --working-dir . -- \\
    python jobs/run.py -c conf/cluster.yaml
"""

import sys

from emotr.cli.main import app

if __name__ == "__main__":
    app(["run", *sys.argv[1:]])
