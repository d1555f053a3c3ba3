import sys

from harness.localkube.cluster import main

sys.exit(main(sys.argv[1:]))
