from memopt.app.cli import main

raise SystemExit(main())
