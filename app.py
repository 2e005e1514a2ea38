"""ULMRec demo (Gradio): `python app.py [--bundle DIR|repo-id] [--host H] [--port N]`.

Also the Hugging Face Space entry point (app_file: app.py). The app lives in ulmrec/app/.
"""
import sys

from ulmrec.app import main

if __name__ == "__main__":
    sys.exit(main())
