"""`python -m sagellm.cli.reference [DOCS_DIR]`: rewrites the generated part of the reference pages (default
`docs/`, run from the checkout) after a command, an option, an engine setting or an operator parameter changes."""

import sys
from pathlib import Path

from sagellm.cli.reference import PAGES, write_pages

docs = Path(sys.argv[1] if len(sys.argv) > 1 else "docs")
changed = write_pages(docs)
print(f"{len(changed)} of {len(PAGES)} pages rewritten: {', '.join(map(str, changed)) or 'all were current'}")
