"""Command-line help shared by every script. Imports nothing heavy, so that --help answers before torch loads."""
import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps a docstring's layout and ends every option's help with its default."""


def show_defaults(parser):
    """Give options without a help text one, so that HelpFormatter (which skips those) lists their default."""
    for action in parser._actions:
        if action.help is None:
            action.help = "(default: %(default)s)"
    return parser
