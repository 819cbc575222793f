from fesloop.cli import main

raise SystemExit(main())
