import os
import sys

print(f"{os.environ.get('GREETING', 'hi')} from python {sys.version.split()[0]}: {6 * 7}")
