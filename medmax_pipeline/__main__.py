from medmax_pipeline.cli import main

raise SystemExit(main())
