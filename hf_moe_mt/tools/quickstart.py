"""placeholder replaced below"""
def add_quickstart_parser(subparsers):
    pass
