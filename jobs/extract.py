"""Ray job entry point for `emotr extract`, e.g.

ray job submit --address http://HEAD:8265 --working-dir . -- \\
    python jobs/extract.py -c conf/cluster.yaml
"""

import sys

from emotr.cli.main import app

if __name__ == "__main__":
    app(["extract", *sys.argv[1:]])
