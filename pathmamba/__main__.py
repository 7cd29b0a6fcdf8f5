from pathmamba.cli import main

raise SystemExit(main())
