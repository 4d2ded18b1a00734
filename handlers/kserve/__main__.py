import sys

from .adapter import main

main(sys.argv[1:])
