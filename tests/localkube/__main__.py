import sys

from localkube.cluster import main

sys.exit(main(sys.argv[1:]))
