from jitckpt.cli import main

raise SystemExit(main())
